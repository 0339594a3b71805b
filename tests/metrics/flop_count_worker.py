"""Counts the FLOPs of one forward+backward of the real tiny megatron-core model (own process).

    python tests/metrics/flop_count_worker.py SEQ_LENGTH BATCH

Runs in a separate process because it initialises torch.distributed and megatron-core's parallel
state, which must not leak into the test process. Prints one JSON object: the total counted by
``torch.utils.flop_counter.FlopCounterMode`` and the count per aten op.
"""

import json
import sys
import tempfile


def main(seq_length: int, batch: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from torch.utils.flop_counter import FlopCounterMode

    from flagscale.config import load_config, validate
    from flagscale.models import build_model
    from flagscale.platform import setup_platform

    platform = setup_platform("cpu")
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        cfg = load_config(None, ["model.preset=tiny", f"train.seq_length={seq_length}",
                                 f"train.global_batch_size={batch}",
                                 f"train.micro_batch_size={batch}"])
        layout = validate(cfg, world_size=1, check_paths=False)
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(cfg.train.seed)
        model = build_model(cfg, layout, platform)[0]
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_length), generator=gen)
        labels = torch.randint(0, cfg.model.vocab_size, (batch, seq_length), generator=gen)
        positions = torch.arange(seq_length).unsqueeze(0).expand(batch, -1)
        with FlopCounterMode(display=False) as counter:
            loss = model(tokens, positions, attention_mask=None, labels=labels)
            loss.float().mean().backward()
        by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
        print(json.dumps({"total": int(counter.get_total_flops()), "by_op": by_op,
                          "tokens": batch * seq_length}))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
