"""flagscale: pretraining dense Llama-family LLMs on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import time about every optional kernel library it does not find, and
# about deprecated calls inside it. The platform start-up line states which kernels are
# active, so these repeat it (once per rank) without telling the user anything to do.
for _message in (r".*Apex is not installed.*", r".*Transformer Engine and Apex are not installed.*",
                 r".*full scope is deprecated.*",
                 r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
                 r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
                 # torch deprecations hit inside megatron-core's checkpoint code, not ours.
                 r".*deprecating ShardedTensor.*", r".*`load_state_dict` is deprecated.*",
                 r".*torch\.distributed is disabled, unavailable or uninitialized.*"):
    warnings.filterwarnings("ignore", message=_message)
