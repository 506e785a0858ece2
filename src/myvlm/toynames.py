"""The names of the packaged toy models, in one place: model loading, the toy world and the CLI all read them here
(a module without imports, so the CLI can offer them without loading torch)."""

TOY_LLAVA, TOY_BLIP2 = TOY_MODELS = ("toy-llava", "toy-blip2")
