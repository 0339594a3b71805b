"""flagscale: pretraining dense Llama-family LLMs on megatron-core.

Importing the package has no side effects. megatron-core's warnings that tell a user nothing to do
are muted only while a ``flagscale`` command runs, around ``setup_platform`` and around
checkpoint saves and loads (:func:`flagscale.platform.megatron_quiet`).
"""

__version__ = "0.1.0"
