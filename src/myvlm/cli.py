"""The `myvlm` command line. Every user error is one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from myvlm.errors import MyVLMError
from myvlm.toynames import TOY_MODELS


def _library(args):
    from myvlm.library import ConceptLibrary

    return ConceptLibrary(args.library, on_damage=lambda name, error: _warn_damaged(args, name, error))


def _warn_damaged(args, name: str, error: str) -> None:
    """One line per damaged concept that a command over the whole library skips, with the way out."""
    import shlex

    where = f" --library {shlex.quote(args.library)}" if args.library else ""
    quoted = shlex.quote(name)
    print(
        f"myvlm: warning: skipping concept '{name}': {one_line(error)}; run 'myvlm concept check {quoted}{where}' "
        f"or remove it with 'myvlm concept remove {quoted}{where}'",
        file=sys.stderr,
    )


def _load_images(paths, *, skip_bad: bool):
    """Images from files/folders; with skip_bad, a broken file is reported and skipped, the rest processed."""
    from myvlm.images import collect_images, load_image

    images, names, failed = [], [], []
    for path in collect_images(paths):
        try:
            images.append(load_image(path))
            names.append(str(path))
        except MyVLMError as error:
            if not skip_bad:
                raise
            failed.append(one_line(error))
    if not images:  # one line, with the reason
        raise MyVLMError(
            failed[0] if len(failed) == 1 else f"none of the {len(failed)} images could be read: {failed[0]}"
        )
    for reason in failed:
        print(f"myvlm: skipping {reason}", file=sys.stderr)
    return images, names


def _use_library(vlm, args) -> list[str]:
    """Load the library's concepts into the model, saying which ones it cannot use rather than dropping them quietly."""
    library = _library(args)
    loaded = vlm.use_library(library)
    concepts = library.concepts()
    untrained = [c.name for c in concepts if c.name not in loaded]
    if untrained:
        print(f"myvlm: note: not trained for {vlm.model_id}, not recognized: {', '.join(untrained)}", file=sys.stderr)
    _note_headless([c for c in concepts if c.name in loaded])
    return loaded


def _note_headless(concepts) -> None:
    """A concept without a head is never detected, so never inserted: say so instead of leaving it out quietly."""
    headless = [c.name for c in concepts if c.head is None]
    if headless:
        print(
            f"myvlm: note: no concept head, never detected: {', '.join(headless)} "
            "(build one from photos: myvlm concept edit NAME --images PHOTOS)",
            file=sys.stderr,
        )


def _load_model(name: str, *, checked: bool = False, **options):
    """The model, after the checks that need no torch (unless `checked` already): a misspelt name or an unreachable
    hub fails in one line."""
    if not checked:
        from myvlm.hub import check_model_name

        check_model_name(name)
    from myvlm.model import load

    return load(name, **options)


def _write_json(path: str, obj) -> None:
    from myvlm.storage import write_json_atomic

    write_json_atomic(Path(path), obj)  # any JSON value, written atomically


def _add_model_options(command) -> None:
    """Where and how a command's model runs; every command that loads a model takes these (`_load_options`)."""
    group = command.add_argument_group("where the model runs")
    group.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights' dtype (auto: bfloat16 on CUDA, float16 on MPS, float32 on CPU and for toys)",
    )
    group.add_argument(
        "--device-map", choices=["auto"], help="spread a model larger than one GPU over all (accelerate)"
    )
    bits = group.add_mutually_exclusive_group()
    bits.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the frozen VLM to 4 bits (CUDA, bitsandbytes)"
    )
    bits.add_argument(
        "--load-in-8bit", action="store_true", help="quantize the frozen VLM to 8 bits (CUDA, bitsandbytes)"
    )


def _add_job_options(command) -> None:
    """Where a caption or detect job's rows go, and the engine that runs it (`_photo_job`)."""
    command.add_argument(
        "--out",
        help="append one JSON row per photo to this .jsonl as each batch ends (a re-run resumes), or write .parquet",
    )
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    group = command.add_argument_group("engine")
    group.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local (default) or ray: a Ray Data pipeline"
    )
    group.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    group.add_argument("--workers", type=positive_int, default=2, help="Ray: actors per model stage (default: 2)")
    group.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs per captioning actor (default: 0; 0.5 shares)"
    )


def _load_options(args) -> dict:
    """myvlm.load's keyword arguments from the options `_add_model_options` adds."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "device_map": args.device_map,
        "load_in_4bit": args.load_in_4bit,
        "load_in_8bit": args.load_in_8bit,
    }


# --- concept management ---------------------------------------------------------------------------------------------
def _build_head(args, kind: str):
    """The concept head from --images (and --negatives, --encoder), saying what it does while it takes its time."""
    from myvlm.library import build_head
    from myvlm.vision_encoder import PREFIX

    if args.negatives and kind == "person":
        raise MyVLMError("--negatives is for object concepts; a person is told apart by the faces enrolled")
    images, names = _load_images(args.images, skip_bad=False)
    negatives = _load_images(args.negatives, skip_bad=True)[0] if args.negatives else None
    what = "enrolling the faces of" if kind == "person" else "building the object head from"
    print(f"myvlm: {what} {len(images)} photos...", file=sys.stderr, flush=True)
    encoder = args.encoder
    if encoder.startswith(PREFIX):  # a VLM's own vision tower; anything else needs no VLM code (transformers: ~7 s)
        from myvlm.model import resolve_encoder

        encoder = resolve_encoder(encoder)
    if kind == "object" and isinstance(encoder, str) and "OMP_NUM_THREADS" not in os.environ:
        head = _on_one_thread(build_head, kind, images, negatives, sources=names, encoder=encoder)
    else:
        head = build_head(kind, images, negatives, sources=names, encoder=encoder)
    for note in head.notes:
        print(f"myvlm: warning: {note}", file=sys.stderr)
    return head, len(images)


def _on_one_thread(function, *args, **kwargs):
    """Run `function` with torch on one thread. A registry encoder (EfficientNet-Lite0) runs small batches of a
    mobile network, which a second thread barely speeds up and, where other jobs share the cores, slows down: `concept
    add` of 4 photos took 22.7 s on torch's default 2 threads and 11.1 s on one (benchmarks/RESULTS.md)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def cmd_concept_add(args) -> None:
    from myvlm.heads import ObjectHead
    from myvlm.heads.objects import calibrate_together
    from myvlm.library import check_name

    library = _library(args)
    name = check_name(args.name)
    if name in library:
        raise MyVLMError(f"a concept named '{name}' already exists; remove it first or pick a new name")
    identifier = library.check_identifier(args.identifier or name)  # before any photo is read
    class_word = check_name(args.class_word, "class word") if args.class_word is not None else None
    head, count = _build_head(args, args.kind)
    kin, recalibrated = {}, []
    if args.kind == "object" and class_word:  # concepts sharing the class word are each other's negatives
        kin = {
            c.name: library.load_head(c.name)
            for c in library.concepts()
            if c.kind == "object" and c.class_word == class_word and c.head
        }
        recalibrated = calibrate_together(name, head, {n: h for n, h in kin.items() if isinstance(h, ObjectHead)})
    concept = library.create(name, kind=args.kind, identifier=identifier, class_word=class_word, head=head)
    for other in recalibrated:
        library.save_head(other, kin[other])
        print(f"re-calibrated '{other}' and '{name}' against each other's photos (both are a {class_word})")
    print(f"added {concept.kind} concept '{concept.name}' (identifier '{concept.identifier}') from {count} photos")


def cmd_concept_edit(args) -> None:
    from myvlm.library import check_name

    library = _library(args)
    concept = library.get(args.name)
    if args.identifier is None and args.class_word is None and not args.images:
        raise MyVLMError("nothing to change; give --identifier, --class-word or --images")
    if args.negatives and not args.images:
        raise MyVLMError("--negatives go with --images, which rebuild the concept's head")
    identifier = library.check_identifier(args.identifier, concept.name) if args.identifier is not None else None
    class_word = check_name(args.class_word, "class word") if args.class_word is not None else None
    if args.images:
        head, count = _build_head(args, concept.kind)
        library.save_head(concept.name, head)
        print(f"rebuilt the head of '{concept.name}' from {count} photos")
    if identifier is not None or class_word is not None:
        edited = library.edit(concept.name, identifier=identifier, class_word=class_word)
        print(f"'{edited.name}': identifier '{edited.identifier}', class word '{edited.class_word or '-'}'")
        if identifier is not None and identifier != concept.identifier and edited.embeddings:
            print(
                f"myvlm: note: its embeddings ({', '.join(sorted(edited.embeddings))}) learnt to say "
                f"'{concept.identifier}'; retrain them with `myvlm train {edited.name} --model MODEL`",
                file=sys.stderr,
            )


def cmd_concept_list(args) -> None:
    library = _library(args)
    concepts = library.concepts()
    rows = [
        {
            "name": c.name,
            "status": "ok",
            "identifier": c.identifier,
            "kind": c.kind,
            "class_word": c.class_word,
            "head": c.head is not None,
            "models": sorted(c.embeddings),
        }
        for c in concepts
    ]
    damaged = [{"name": name, "status": "damaged", "error": error} for name, error in library.damaged.items()]
    if args.json:
        print(json.dumps(rows + damaged, indent=2, ensure_ascii=False))
        return
    if not rows and not damaged:
        print(f"no concepts in {library.root}")

    def describe(model: str, concept) -> str:
        entry = concept.embedding(model)
        if not entry.complete:
            return f"{model} (interrupted at step {entry.steps}; `myvlm train --resume`)"
        return f"{model} (trained with {', '.join(entry.together['with'])})" if entry.together else model

    for row, concept in zip(rows, concepts, strict=True):
        models = ", ".join(describe(m, concept) for m in sorted(concept.embeddings))
        models = models or "no embeddings yet"
        head = "head" if row["head"] else "no head (never detected)"
        print(
            f"{row['name']:<20} {row['kind']:<7} identifier={row['identifier']:<12} "
            f"class={row['class_word'] or '-':<10} {head:<6}  {models}"
        )
    for row in damaged:
        print(f"{row['name']:<20} DAMAGED {one_line(row['error'])}")


def cmd_concept_check(args) -> int:
    """Verify manifests, tensor checksums and shapes, and heads; exit 1 if any concept is damaged."""
    library = _library(args)
    statuses = [library.check(name) for name in args.name] if args.name else library.scan()
    damaged = [s.name for s in statuses if not s.ok]
    if args.json:
        rows = [
            {"name": s.name, "status": "ok" if s.ok else "damaged", "error": s.error, "unchecked": s.unchecked}
            for s in statuses
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 1 if damaged else 0
    if not statuses:
        print(f"no concepts in {library.root}")
    for status in statuses:
        if not status.ok:
            state = f"damaged: {one_line(status.error)}"
        elif status.unchecked:
            unchecked = " and ".join(status.unchecked)
            state = f"ok (no checksum for {unchecked}: written by an earlier myvlm, damage inside may go unseen)"
        else:
            state = "ok"
        print(f"{status.name:<20} {state}")
    if damaged:
        print(f"{len(damaged)} of {len(statuses)} concepts damaged: {', '.join(damaged)}")
    return 1 if damaged else 0


def cmd_concept_remove(args) -> None:
    _library(args).remove(args.name)
    print(f"removed concept '{args.name}'")


def _vision_towers(heads) -> dict:
    """The VLM vision towers object heads score with (`vision-tower:MODEL`), loaded once each; VLM code (transformers,
    ~7 s to import) is loaded only when a head needs it."""
    from myvlm.vision_encoder import tower_encoder_names

    names = tower_encoder_names(heads.values())
    if not names:
        return {}
    from myvlm.model import resolve_encoder

    return {n: resolve_encoder(n) for n in names}


def cmd_detect(args) -> None:
    from myvlm.heads import ConceptDetector
    from myvlm.jobs import DETECT, Labeler

    library = _library(args)
    concepts = library.concepts()
    heads = {c.name: library.load_head(c.name) for c in concepts}
    heads = {n: h for n, h in heads.items() if h is not None}
    _note_headless(concepts)
    if not heads:
        raise MyVLMError(f"no concepts with heads in {library.root}; add one with `myvlm concept add`")
    _photo_job(args, DETECT, lambda: Labeler(ConceptDetector(heads, _vision_towers(heads))))


# --- model commands -------------------------------------------------------------------------------------------------
def cmd_caption(args) -> None:
    from myvlm.hub import check_model_name
    from myvlm.jobs import CAPTION, Labeler

    check_model_name(args.model)
    loaded = []

    def labeler():
        vlm = _load_model(args.model, checked=True, **_load_options(args))
        loaded.extend(_use_library(vlm, args))
        return Labeler(vlm.detector, vlm, args.batch_size)

    kept = _photo_job(args, CAPTION, labeler)
    if args.report:
        from myvlm.report import write_report

        table = [
            (im, r["image"], [", ".join(r["concepts"]) or "-", r["caption"]], bool(r["concepts"])) for r, im in kept
        ]
        write_report(
            args.report,
            f"myvlm captions — {args.model}",
            ["concepts", "caption"],
            table,
            {"model": args.model, "concepts loaded": ", ".join(loaded) or "none", "images": len(kept)},
        )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _photo_job(args, kind: str, labeler) -> list[tuple[dict, object]]:
    """Run a caption or detect job over the photos (files and folders, walked recursively) with the chosen engine.

    With --out, rows stream to that file (a re-run resumes) and a summary line is printed; without, each row is
    printed as its batch ends. Returns the labelled rows with thumbnails where the command writes them all at the end
    (JSON, a report)."""
    from myvlm.jobs import CAPTION, NoFile, open_results, run_job

    if args.engine == "ray":
        from myvlm.ray_engine import import_ray

        import_ray()  # not installed: said before anything is read or written
        if args.json or getattr(args, "report", None) or not args.out:
            raise MyVLMError("--engine ray writes its rows to --out (.jsonl or .parquet) only")
    results = open_results(args.out, kind) if args.out else NoFile()
    kept = []
    keep = bool(args.json or getattr(args, "report", None))

    def on_rows(rows, images) -> None:
        for row, image in zip(rows, images, strict=True):
            if "error" in row:
                continue
            if not args.out:
                if kind == CAPTION:
                    print(f"{row['image']}: {row['caption']}", flush=True)
                else:
                    hits = ", ".join(f"{d['concept']} ({d['score']:.2f})" for d in row["detections"]) or "-"
                    print(f"{row['image']}: {hits}", flush=True)
            if keep:
                thumbnail = image.copy()
                thumbnail.thumbnail((256, 256))
                kept.append((row, thumbnail))

    if args.engine == "ray":
        from myvlm.ray_engine import run_ray_job

        summary = run_ray_job(
            args.images,
            kind,
            results,
            library=args.library,
            model=getattr(args, "model", None),
            load_options=_load_options(args) if kind == CAPTION else None,
            batch_size=args.batch_size,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            address=args.address,
            quiet=args.quiet,
            note=_say,
        )
    else:
        summary = run_job(
            args.images, labeler, results, batch_size=args.batch_size, quiet=args.quiet, on_rows=on_rows, note=_say
        )
    if summary.failed and not summary.labeled and not summary.skipped:  # nothing could be read: one line, the reason
        first, count = summary.first_error, summary.failed
        raise MyVLMError(first if count == 1 else f"none of the {count} images could be read: {first}")
    if args.json:
        _write_json(args.json, [row for row, _ in kept])
    if args.out:
        done = f"; {summary.skipped} done before" if summary.skipped else ""
        unreadable = f", {summary.failed} unreadable" if summary.failed else ""
        print(f"{kind}: {summary.labeled} photos{unreadable}{done}; rows in {args.out}")
    return kept


def cmd_ask(args) -> None:
    from myvlm.hub import check_model_name
    from myvlm.images import load_image

    check_model_name(args.model)
    image = load_image(args.image)
    if not args.question.strip():
        raise MyVLMError("the question is empty")
    vlm = _load_model(args.model, checked=True, **_load_options(args))
    _use_library(vlm, args)
    answer = vlm.ask(image, args.question)
    print(answer.text)


def _note_retraining(library, name: str, model: str, resume: bool) -> None:
    """Say that a training replaces the stored embedding rather than overwrite it silently."""
    from myvlm.model import resolve_model

    entry = library.get(name).embedding(resolve_model(model)[1])
    if entry and entry.complete and not resume:
        print(
            f"myvlm: note: replacing the embedding of '{name}' for {model} saved {entry.saved or ''}".rstrip(),
            file=sys.stderr,
        )


def cmd_train(args) -> None:
    from myvlm.hub import check_model_name

    check_model_name(args.model)
    from myvlm.personalize import MissingClassWord, TrainingInterrupted, train_concept, train_together

    captions = args.captions or []
    if len(args.name) > 1:
        unsupported = [flag for flag, used in (("--images", args.images), ("--resume", args.resume)) if used]
        if args.task != "caption":
            unsupported.append("--task vqa")
        if unsupported:
            raise MyVLMError(f"training several concepts together takes captions only, not {unsupported[0]}")
        if not captions:
            raise MyVLMError("training several concepts together needs --captions naming them in each photo")
        done = train_together(
            _library(args),
            args.name,
            args.model,
            captions=captions,
            steps=args.steps,
            seed=args.seed,
            load_options=_load_options(args),
        )
        joined, n_together = " + ".join(done.names), done.photos_together
        if done.stored:
            print(
                f"trained {joined} together for {done.model_id} ({done.steps} steps, {done.photos} photos): named "
                f"exactly on {done.best} of {n_together} photos together (trained alone: {done.before})"
            )
        elif not done.tries:
            print(f"kept the embeddings trained alone: they already name {joined} on all {n_together} photos together")
        else:
            print(
                f"kept the embeddings trained alone: they name {joined} exactly on {done.before} of {n_together} "
                f"photos together, {len(done.tries)} trainings together on {max(done.tries)} at most"
            )
        return
    if len(captions) > 1:
        raise MyVLMError("one captions file per concept; give several only when training several concepts together")
    if not args.images and not captions:
        raise MyVLMError("give the training photos with --images, or a concept folder's captions.json with --captions")
    library = _library(args)
    _note_retraining(library, args.name[0], args.model, args.resume)
    try:
        done = train_concept(
            library,
            args.name[0],
            args.model,
            task=args.task,
            captions=captions[0] if captions else None,
            images=args.images,
            steps=args.steps,
            seed=args.seed,
            resume=args.resume,
            load_options=_load_options(args),
        )
    except TrainingInterrupted as interrupted:
        raise KeyboardInterrupt(f"{interrupted}; continue with `myvlm train ... --resume`") from None
    except MissingClassWord:
        raise MyVLMError(
            f"concept '{args.name[0]}' has no class word; give --captions, or set it with "
            f"`myvlm concept edit {args.name[0]} --class-word WORD`"
        ) from None
    note = f" ({done.stopped_early})" if done.stopped_early else ""
    print(f"trained '{done.name}' for {done.model_id}: {done.steps} steps, loss {done.final_loss:.3f}{note}")


def cmd_import(args) -> None:
    from myvlm.official import load_official_embedding

    library = _library(args)
    concept = library.get(args.concept)
    vector, info = load_official_embedding(args.checkpoint, step=args.step)
    vlm = _load_model(args.model, **_load_options(args))
    vlm.add_concept(concept.name, concept.identifier, vector)  # checks the width against the model
    library.save_embedding(concept.name, vlm.model_id, vector, family=vlm.family, **info)
    print(f"imported step {info['step']} of {args.checkpoint} into '{concept.name}' for {vlm.model_id}")


def cmd_eval(args) -> None:
    from myvlm.evaluate import evaluate_concept
    from myvlm.runtime import PeakMemory

    library = _library(args)
    concept = library.get(args.concept)
    with PeakMemory() as peak:
        vlm = _load_model(args.model, **_load_options(args))
        loaded = vlm.use_library(library)
        if concept.name not in loaded:
            raise MyVLMError(f"concept '{concept.name}' has no embedding for {vlm.model_id}; train it first")
        positives, _ = _load_images([args.positives], skip_bad=True)
        negatives, _ = _load_images([args.negatives], skip_bad=True)
        metrics = {"model": vlm.model_id, "concept": concept.name}
        metrics |= evaluate_concept(vlm, concept.identifier, concept.class_word, positives, negatives)
    metrics |= peak.report()
    if args.json:
        _write_json(args.json, metrics)
    for key, value in metrics.items():
        print(f"{key:<14} {value}")


def cmd_demo(args) -> None:
    from myvlm.demo import run_demo
    from myvlm.runtime import PeakMemory

    with PeakMemory() as peak:
        metrics = run_demo(
            args.model,
            report_path=args.report,
            seed=args.seed,
            concept_index=args.concept,
            load_options=_load_options(args),
        )
    if args.json:
        _write_json(args.json, metrics | peak.report())


def cmd_check(args) -> int:
    """Self-test of a model on this machine: exit 0 only when every check holds."""
    from myvlm.check import run_check
    from myvlm.model import load
    from myvlm.runtime import PeakMemory

    with PeakMemory() as peak:
        vlm = load(args.model, **_load_options(args))
        report = run_check(vlm, steps=args.steps)
    result = report.to_dict() | peak.report() | {"seconds": round(peak.seconds, 2)}
    if args.json:
        _write_json(args.json, result)
    print(f"{report.model} ({report.family}) on {report.device}, {report.dtype}")
    for check in report.checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name:<26} {check.detail}")
    peak_mb = result["peak_memory_mb"]
    memory = "unknown" if peak_mb is None else f"{peak_mb:.0f} MB ({result['peak_memory_of']})"
    print(f"  {report.seconds_per_step:.3f} s per training step, peak memory {memory}")
    failed = [c.name for c in report.checks if not c.ok]
    print("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 0 if report.ok else 1


def cmd_bench(args) -> None:
    """The published protocol on a dataset folder: train every concept, print the table (and write JSON/Markdown)."""
    from myvlm.bench import METRICS, markdown_table, read_dataset, run_bench
    from myvlm.model import load
    from myvlm.runtime import PeakMemory
    from myvlm.training import TrainingConfig

    dataset = read_dataset(args.data, n_train=args.train_photos)
    config = TrainingConfig(task=args.task, steps=args.steps, seed=args.seed)
    with PeakMemory() as peak:
        vlm = load(args.model, **_load_options(args))
        result = run_bench(vlm, dataset, config, gate=args.gate, max_images=args.max_images, batch_size=args.batch_size)
    result |= peak.report() | {"seconds": round(peak.seconds, 2)}
    if args.json:
        _write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(result["concepts"], result["overall"]), encoding="utf-8")
    print(
        f"{vlm.model_id} on {dataset.root} ({dataset.layout} layout, {len(dataset.concepts)} concepts, task "
        f"{args.task}, {args.steps} steps, concept inserted: {args.gate})"
    )
    short = {"recognition_positive": "rec_pos", "recognition_negative": "rec_neg", "recognition_weighted": "rec_w"}
    names = [short.get(m, m.removesuffix("_accuracy")) for m in METRICS]
    print(f"{'concept':<16}" + "".join(f"{n:>11}" for n in names))
    for row in [*result["concepts"], {"concept": "mean", **result["overall"]}]:
        cells = ["–" if row.get(m) is None else f"{row[m]:.3f}" if m != "seconds" else f"{row[m]:.1f}" for m in METRICS]
        print(f"{row['concept']:<16}" + "".join(f"{c:>11}" for c in cells))
    peak_mb = result["peak_memory_mb"]
    print(f"peak memory {'unknown' if peak_mb is None else f'{peak_mb:.0f} MB'} ({result['peak_memory_of']})")


def cmd_toyworld_export(args) -> None:
    from myvlm.toyworld import export_dataset

    out = export_dataset(args.out, n_concepts=args.concepts, seed=args.seed, layout=args.layout)
    print(f"wrote toyworld dataset to {out}")


def cmd_toyworld_build(args) -> None:
    from myvlm.toyworld import build_model

    out = build_model(args.model, args.out, seed=args.seed, threads=args.threads)
    print(f"built {args.model} into {out}")


def cmd_serve(args) -> None:
    from myvlm.serve import serve

    serve(args.model, args.library, host=args.host, port=args.port, auth=args.auth, share=args.share)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


BATCH_SIZE = 16  # captions at once (benchmarks/caption_throughput.py: toy-llava, batch 16-24 vs 1: 2.9-3.4x)
MODEL_HELP = "hub id (e.g. Salesforce/blip2-flan-t5-xl), local model folder, toy-llava or toy-blip2"


def build_parser() -> argparse.ArgumentParser:
    from myvlm import __version__

    parser = argparse.ArgumentParser(prog="myvlm", description="Personalize vision-language models to your concepts.")
    parser.add_argument("--version", action="version", version=f"myvlm {__version__}", help="show the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, handler, help_text, parent=sub):
        command = parent.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    def with_library(command):
        command.add_argument("--library", help="concept library folder (default: $MYVLM_HOME or ~/.myvlm)")
        return command

    demo = add("demo", cmd_demo, "personalize a toy VLM to a toyworld concept and show base vs personalized captions")
    demo.add_argument("--model", default=TOY_MODELS[0], choices=TOY_MODELS, help="toy VLM to personalize")
    demo.add_argument("--concept", type=int, default=0, help="which toyworld concept (index)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the head and the training")
    demo.add_argument("--json", help="write the metrics as one JSON object")
    demo.add_argument("--report", help="write an HTML report with thumbnails and both captions")
    _add_model_options(demo)

    concept = add("concept", None, "add, list and remove concepts")
    concept_sub = concept.add_subparsers(dest="concept_command", required=True, metavar="ACTION")
    concept_add = with_library(add("add", cmd_concept_add, "add a concept from a few photos", concept_sub))
    concept_add.add_argument("name", help="the concept's name in the library")
    concept_add.add_argument("--images", nargs="+", required=True, help="photos (files or folders)")
    concept_add.add_argument(
        "--kind", choices=["person", "object"], required=True, help="person: found by face; object: by appearance"
    )
    concept_add.add_argument("--identifier", help="the word the VLM should use (default: the name)")
    concept_add.add_argument("--class-word", help="what it is, e.g. dog, mug, man")
    concept_add.add_argument("--negatives", nargs="+", help="photos without the concept, files or folders (objects)")
    concept_add.add_argument(
        "--encoder",
        default="efficientnet-lite0",
        help="image encoder of the object head; vision-tower:MODEL uses that VLM's own vision tower (toy models)",
    )
    concept_edit = with_library(
        add("edit", cmd_concept_edit, "change a concept's identifier or class word, or rebuild its head", concept_sub)
    )
    concept_edit.add_argument("name", help="the concept to change")
    concept_edit.add_argument("--identifier", help="the word the VLM should use")
    concept_edit.add_argument("--class-word", help="what it is, e.g. dog, mug, man")
    concept_edit.add_argument("--images", nargs="+", help="photos to rebuild the concept's head from")
    concept_edit.add_argument("--negatives", nargs="+", help="photos without the concept (objects, with --images)")
    concept_edit.add_argument("--encoder", default="efficientnet-lite0", help="image encoder of a rebuilt object head")
    concept_list = with_library(add("list", cmd_concept_list, "list concepts", concept_sub))
    concept_list.add_argument("--json", action="store_true", help="print the concepts as JSON")
    concept_remove = with_library(add("remove", cmd_concept_remove, "remove a concept", concept_sub))
    concept_remove.add_argument("name", help="the concept to remove, with its head and embeddings")
    concept_check = with_library(
        add("check", cmd_concept_check, "verify concepts' files; exit 1 if any is damaged", concept_sub)
    )
    concept_check.add_argument("name", nargs="*", help="concepts to check (default: all)")
    concept_check.add_argument("--json", action="store_true", help="print the statuses as JSON")

    detect = with_library(add("detect", cmd_detect, "find library concepts in photos"))
    detect.add_argument("images", nargs="+", help="photos (files or folders, walked recursively)")
    detect.add_argument("--json", help="write [{image, concepts, detections}] to this file (small jobs)")
    detect.add_argument("--batch-size", type=positive_int, default=32, help="photos detected at once (default: 32)")
    _add_job_options(detect)

    train = with_library(add("train", cmd_train, "learn a concept's embedding for a model"))
    train.add_argument(
        "name",
        nargs="+",
        help="the concept; several concepts already trained alone are fine-tuned together, so one caption names all",
    )
    train.add_argument("--model", required=True, help=MODEL_HELP)
    train.add_argument(
        "--task", choices=["caption", "vqa"], default="caption", help="caption, or vqa to add question-answer pairs"
    )
    train.add_argument("--images", nargs="+", help="training photos (default: a concept folder given by --captions)")
    train.add_argument(
        "--captions",
        nargs="+",
        help="captions.json (image name -> captions) in the photos' folder; for several concepts, files of photos "
        "showing them together and of each alone",
    )
    train.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default: 100)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the training")
    train.add_argument("--resume", action="store_true", help="continue an interrupted training (Ctrl-C, crash)")
    _add_model_options(train)

    caption = with_library(add("caption", cmd_caption, "caption photos, naming the concepts found in them"))
    caption.add_argument("images", nargs="+", help="photos (files or folders, walked recursively)")
    caption.add_argument("--model", required=True, help=MODEL_HELP)
    caption.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, help=f"photos captioned at once (default: {BATCH_SIZE})"
    )
    caption.add_argument("--json", help="write [{image, concepts, detections, caption}] to this file (small jobs)")
    caption.add_argument("--report", help="write an HTML report (small jobs)")
    _add_job_options(caption)
    _add_model_options(caption)

    ask = with_library(add("ask", cmd_ask, "ask a question about a photo"))
    ask.add_argument("image", help="one photo")
    ask.add_argument("question", help='e.g. "What is Bobby doing?"')
    ask.add_argument("--model", required=True, help=MODEL_HELP)
    _add_model_options(ask)

    evaluate = with_library(add("eval", cmd_eval, "recall/precision/F1 of a concept's name, preservation, similarity"))
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    evaluate.add_argument("--concept", required=True, help="the trained concept to evaluate")
    evaluate.add_argument("--positives", required=True, help="folder of photos showing the concept")
    evaluate.add_argument("--negatives", required=True, help="folder of photos without it")
    evaluate.add_argument("--json", help="write the metrics as one JSON object (with the peak memory)")
    _add_model_options(evaluate)

    importer = with_library(add("import", cmd_import, "import an official MyVLM embedding checkpoint"))
    importer.add_argument("checkpoint", help="concept_embeddings_<VLM>_<TASK>.pt")
    importer.add_argument("--concept", required=True, help="existing library concept to attach it to")
    importer.add_argument("--model", required=True, help="the model it was trained for: " + MODEL_HELP)
    importer.add_argument("--step", type=int, help="training step to import (default: the last)")
    _add_model_options(importer)

    check = add("check", cmd_check, "self-test a model here: hooks, gating, regularizer, training, captioning")
    check.add_argument("model", help="hub id, local folder, toy-llava or toy-blip2")
    check.add_argument("--steps", type=positive_int, default=10, help="cached training steps to run")
    check.add_argument("--json", help="write the checks, seconds per step and peak memory as one JSON object")
    _add_model_options(check)

    bench = add("bench", cmd_bench, "train every concept of a dataset and report the published tables' metrics")
    bench.add_argument("--data", required=True, help="dataset folder, MyVLM or Yo'LLaVA layout (README)")
    bench.add_argument("--model", required=True, help="hub id, local folder, toy-llava or toy-blip2")
    bench.add_argument("--task", choices=["caption", "vqa"], default="caption", help="training recipe")
    bench.add_argument("--steps", type=positive_int, default=100, help="training steps per concept")
    bench.add_argument("--seed", type=int, default=0, help="random seed of the trainings")
    bench.add_argument(
        "--gate",
        choices=["always", "oracle"],
        default="always",
        help="insert the concept in every test photo (always) or only in its own photos (oracle: perfect heads)",
    )
    bench.add_argument("--train-photos", type=positive_int, default=4, help="MyVLM layout: photos trained on")
    bench.add_argument("--max-images", type=positive_int, help="at most this many positives, negatives, questions")
    bench.add_argument("--batch-size", type=positive_int, default=8, help="photos captioned at once (default: 8)")
    bench.add_argument("--json", help="write the per-concept rows, the means and the peak memory to this file")
    bench.add_argument("--markdown", help="write the table as Markdown to this file")
    _add_model_options(bench)

    serve = with_library(add("serve", cmd_serve, "a local web app: add, train and caption concepts in a browser"))
    serve.add_argument("--model", default=TOY_MODELS[0], help=MODEL_HELP + f" (default: {TOY_MODELS[0]})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    serve.add_argument("--auth", metavar="USER:PASS", help="ask for this login (needed with a --host others reach)")
    serve.add_argument("--share", action="store_true", help="also on a public gradio.live URL (needs --auth)")

    toyworld = add("toyworld", None, "the synthetic toy world: export data, rebuild the toy models")
    toy_sub = toyworld.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    export = add("export", cmd_toyworld_export, "write a personalization dataset in the MyVLM layout", toy_sub)
    export.add_argument("--out", required=True, help="folder to write the dataset to")
    export.add_argument("--concepts", type=positive_int, default=2, help="how many toyworld concepts (default: 2)")
    export.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    export.add_argument(
        "--layout",
        choices=["myvlm", "yollava", "both"],
        default="myvlm",
        help="the MyVLM authors' layout, Yo'LLaVA's (train/ test/ yollava-visual-qa.json), or both in subfolders",
    )
    build = add("build", cmd_toyworld_build, "rebuild a toy model bit-for-bit from a seed", toy_sub)
    build.add_argument("--model", required=True, choices=TOY_MODELS, help="which toy model")
    build.add_argument("--out", required=True, help="folder to write the model to")
    build.add_argument("--seed", type=int, default=0, help="random seed (packaged models: 0)")
    build.add_argument("--threads", type=int, default=2, help="torch threads (packaged: 2; bit-for-bit needs the same)")
    return parser


def one_line(error: BaseException) -> str:
    """A message on one line, even when it quotes a file name or a caption with a line break in it."""
    return " ".join(str(error).splitlines())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except MyVLMError as error:
        print(f"myvlm: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"myvlm: interrupted{'; ' + one_line(interrupt) if str(interrupt) else ''}", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an unforeseen failure: still one line, the traceback on request
        if os.environ.get("MYVLM_DEBUG"):
            raise
        print(
            f"myvlm: internal error: {type(error).__name__}: {one_line(error)[:300]} (set MYVLM_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
