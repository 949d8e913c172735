"""The `adapters` library's own forward, run in the reference environment (tests/test_bottleneck.py makes it).

    python adapters_reference.py JOBS.json

JOBS: a list of jobs, each: checkpoint (a local GPT-2 folder), kind (seq_bn | double_seq_bn | par_bn | any
config name the library knows), options (its config fields), seed, adapter_out (save_adapter's folder),
safetensors (save it so), whole_out (optional: the whole model saved after adapters.init), and, unless
forward is false, ids, new, npz. The adapter's parameters are set to seeded random values; the logits of
every position of `ids` with and without the adapter, and `new` greedy ids, go to the .npz.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def main(job: dict) -> None:
    import adapters
    from adapters import AdapterConfig
    from transformers import GPT2LMHeadModel

    Path(job["adapter_out"]).parent.mkdir(parents=True, exist_ok=True)
    # eager: transformers 4.57's sdpa path ignores scale_attn_by_inverse_layer_idx, which GPT-2's eager attention applies
    model = GPT2LMHeadModel.from_pretrained(job["checkpoint"], attn_implementation="eager").eval()
    adapters.init(model)
    model.add_adapter("bn", config=AdapterConfig.load(job["kind"], **job.get("options", {})))
    model.set_active_adapters("bn")
    torch.manual_seed(job["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.bn." not in name:
                continue
            if name.endswith("scaling") or "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))  # scalings and layer-norm gains around 1
            else:
                p.copy_(job.get("scale", 0.3) * torch.randn_like(p))
    model.eval()
    model.save_adapter(job["adapter_out"], "bn", use_safetensors=job.get("safetensors", False))
    for name in job.get("more", []):  # other adapters beside it (a checkpoint with several)
        model.add_adapter(name, config=job["kind"])
    if job.get("whole_out"):
        try:
            model.save_pretrained(job["whole_out"])
        except RuntimeError:  # a module under two names (ln_before, prelu), which safetensors refuses: as a .bin
            model.save_pretrained(job["whole_out"], safe_serialization=False)
    if not job.get("forward", True):
        return
    ids = torch.tensor([job["ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].numpy()
        greedy = model.generate(input_ids=ids, max_new_tokens=job["new"], do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].numpy()
        model.set_active_adapters(None)
        plain = model(input_ids=ids).logits[0].numpy()
    np.savez(job["npz"], logits=logits, greedy=greedy, plain=plain)


if __name__ == "__main__":
    for job in json.loads(open(sys.argv[1]).read()):
        main(job)
