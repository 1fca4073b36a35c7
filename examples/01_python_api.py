"""The Python API in one page: load a model, generate, save a state, continue from it.

    python examples/01_python_api.py [MODEL]

MODEL is any model spec (a .pth/.safetensors file, owner/repo[:FILE], or an alias such as
rwkv7-g1-0.4b); with none and no $RWKV_MODEL, a small random RWKV-7 is written to a temporary
folder, so the example runs offline (its text is gibberish, its speed and mechanics are real).
"""

import os
import sys
import tempfile

from rwkv_cli import load_model
from rwkv_cli.generate import Generation
from rwkv_cli.hub import resolve_model
from rwkv_cli.sampling import SamplingParams
from rwkv_cli.tokenizer import load_tokenizer_for

spec = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("RWKV_MODEL")
if spec:
    path = resolve_model(spec).path
else:
    from rwkv_cli.testing import random_checkpoint

    path = random_checkpoint(os.path.join(tempfile.mkdtemp(), "random-rwkv7.pth"), "7", 4, 256, vocab_size=65536)
    print(f"(no model given: using a random RWKV-7 at {path})")

model = load_model(path, device="auto", dtype="auto")
tokenizer = load_tokenizer_for(path, model.cfg.vocab_size)
print(f"{model.cfg.describe()} on {model.device}, loaded in {model.load_seconds:.2f} s")

prompt = tokenizer.encode("User: What is a recurrent neural network?\n\nAssistant:")
gen = Generation(model, tokenizer, prompt, SamplingParams(temperature=1.0, top_p=0.3, seed=0), max_tokens=48, stop=("\n\n",))
for text in gen:  # text arrives as it is generated
    print(text, end="", flush=True)
print(f"\n[{gen.finish_reason}] {gen.timings.summary()}")

# The whole conversation so far is this fixed-size state: keep it, continue later, or branch.
snapshot = gen.state.clone()
print(f"state: {snapshot.nbytes / 1e6:.2f} MB for {len(prompt) + len(gen.tokens)} tokens")
follow_up = tokenizer.encode("\n\nUser: And in one word?\n\nAssistant:")
again = Generation(model, tokenizer, follow_up, SamplingParams(temperature=0), max_tokens=16, stop=("\n\n",), state=snapshot)
print("continued:", again.run())
