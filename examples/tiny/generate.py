"""Load an exported flagscale model with plain `transformers` and print a short generation.

    python examples/tiny/generate.py hf/tiny "Life is"
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, prompt: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(f"{type(model).__name__} from {model_dir} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters)\nprompt: {prompt!r}\ngeneration: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Life is")
