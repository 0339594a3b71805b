"""Model families and the megatron-core models built from them.

    spec = get_model_spec(cfg.model)               # the family of cfg.model.family
    chunks = build_model(cfg, layout, platform)    # this rank's GPTModel chunks, initialised

Each family is one module (``llama``, ``mistral``, ``qwen2``) registering a
:class:`~flagscale.models.spec.ModelSpec`; importing this package registers them all. Specs import
without torch (counts, configs and checks need none); ``build_model`` and ``init_weights`` load
``flagscale.models.gpt`` and torch on first use.
"""

from flagscale.models import llama, mistral, qwen2  # noqa: F401  (register the families)
from flagscale.models.spec import (ModelDims, ModelSpec, architecture_keys, check_model, families,
                                   get_model_spec, spec_for_hf_config)

__all__ = ["build_model", "init_weights", "get_model_spec", "check_model", "architecture_keys",
           "families", "spec_for_hf_config", "ModelSpec", "ModelDims"]


def __getattr__(name: str):
    if name in ("build_model", "init_weights"):
        from flagscale.models import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'flagscale.models' has no attribute {name!r}")
