"""Runs BlinkDL's `rwkv` package (the reference engine) in a child process, for parity tests.

The reference reads its configuration from environment variables at import time (RWKV_V7_ON
selects the RWKV-7 class, so one process cannot run both families; RWKV_DE_VERSION=1 on top of it
selects the RWKV-7a DeepEmbed variant); `rwkv_cli.testing` therefore starts this module with the
right environment:

    python -m rwkv_cli._reference_worker JOBS.json

Each job: {"checkpoint", "strategy", "prompt": [ids], "steps": [ids], "out": path.safetensors}
and optionally "greedy": N. The output holds `prompt.logits`, `steps.logits` [S, V], and the
reference's state list after the prompt and after the steps as `prompt.state.{j}` /
`steps.state.{j}` (pip order, §9); with "greedy", `greedy.tokens`: N argmax tokens after the prompt;
with "pipeline": {"ctx", "tokens"[, "temperature"]}, `pipeline.tokens`: what `PIPELINE.generate`
samples with its default arguments (World vocabulary).
"""

import json
import sys

import torch


def run_job(job: dict) -> None:
    from rwkv.model import RWKV  # the reference; RWKV_V7_ON decides which class this is
    from safetensors.torch import save_file

    ckpt = job["checkpoint"]
    model = RWKV(model=ckpt[: -len(".pth")], strategy=job["strategy"])
    out = {}
    logits, state = model.forward(list(job["prompt"]), None)
    out["prompt.logits"] = logits.float().clone()
    if job.get("greedy"):
        tokens, lg, st = [], logits, [t.clone() for t in state]
        for _ in range(job["greedy"]):
            tokens.append(int(lg.argmax()))
            lg, st = model.forward([tokens[-1]], st)
        out["greedy.tokens"] = torch.tensor(tokens)
    for j, t in enumerate(state):
        out[f"prompt.state.{j}"] = t.float().clone()
    if job.get("pipeline"):  # BlinkDL's PIPELINE.generate with its defaults; record every sampled token
        from rwkv.utils import PIPELINE, PIPELINE_ARGS

        spec = job["pipeline"]
        pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
        sampled, sample = [], pipeline.sample_logits
        pipeline.sample_logits = lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1]
        pipeline.generate(spec["ctx"], token_count=spec["tokens"], args=PIPELINE_ARGS(temperature=spec.get("temperature", 1.0)))
        out["pipeline.tokens"] = torch.tensor(sampled)
    step_logits = []
    for token in job["steps"]:
        logits, state = model.forward([token], state)
        step_logits.append(logits.float().clone())
    if step_logits:
        out["steps.logits"] = torch.stack(step_logits)
        for j, t in enumerate(state):
            out[f"steps.state.{j}"] = t.float().clone()
    save_file({k: v.cpu().contiguous() for k, v in out.items()}, job["out"])


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    torch.set_grad_enabled(False)
    for job in jobs:
        run_job(job)


if __name__ == "__main__":
    main()
