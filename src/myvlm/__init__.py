"""myvlm: personalize vision-language models (BLIP-2, LLaVA) to your own concepts, the MyVLM way.

import myvlm
vlm = myvlm.load("toy-llava")                       # or a hub id / local folder of BLIP-2 or LLaVA
result = vlm.learn("bobby", "Bobby", images, captions)
vlm.caption(images, concepts=[["bobby"]] * len(images))
"""

from myvlm.backends import CAPTION, VQA, Backend, register_backend
from myvlm.embeddings import ConceptEmbeddings
from myvlm.errors import MyVLMError
from myvlm.library import Concept, ConceptLibrary
from myvlm.model import Caption, PersonalizedVLM, load
from myvlm.official import load_official_embedding
from myvlm.text import with_identifier
from myvlm.training import (
    Example,
    TrainingConfig,
    TrainingResult,
    caption_examples,
    learn_concept,
    learn_together,
)

__version__ = "0.1.0"

__all__ = [
    "CAPTION",
    "VQA",
    "Backend",
    "Caption",
    "Concept",
    "ConceptEmbeddings",
    "ConceptLibrary",
    "Example",
    "MyVLMError",
    "PersonalizedVLM",
    "TrainingConfig",
    "TrainingResult",
    "caption_examples",
    "learn_concept",
    "learn_together",
    "load",
    "load_official_embedding",
    "register_backend",
    "with_identifier",
]
