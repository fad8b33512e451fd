"""Long prompts on the CPU: the time to parse and chunk a prompt, and the time and peak memory to encode it with
SD1.5's full-size text encoder (ViT-L/14's text tower, random weights, float32), for prompts of 8 to 5,000 tokens.
Each length runs in a fresh process so its peak RSS is its own. Torch runs one thread and the times are the
process's CPU time (median of 3 runs), which other jobs on a shared machine do not inflate as they do wall time.

    python bench/prompts.py [--json bench/results/prompts-cpu.json]
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from tritonsd.engine.config import TextConfig
from tritonsd.engine.prompts import PromptTokenizer, encode_chunks
from tritonsd.engine.text_encoder import TextEncoder
from tritonsd.engine.tokenizer import CLIPTokenizer

items = int(sys.argv[1])
# Three tokens an item: a weighted word, a word and a comma (the last item has none).
prompt = ", ".join(["(lighthouse:1.1) dusk"] * items)
torch.manual_seed(0)
torch.set_num_threads(1)
encoder = TextEncoder(TextConfig()).eval()
words = PromptTokenizer(CLIPTokenizer.default(), TextConfig().vocab_size)
with torch.inference_mode():
    encode_chunks([words.chunks("warm up")], words.empty, encoder, words.tokenizer.pad_id)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parse, encode = [], []
    for _ in range(3):
        start = time.process_time()
        chunks = words.chunks(prompt)
        parse.append(time.process_time() - start)
        # As Pipeline.encode_prompt under guidance: the negative prompt (empty) beside the prompt.
        context, _ = encode_chunks([chunks, words.chunks("")], words.empty, encoder, words.tokenizer.pad_id)
        encode.append(time.process_time() - start)
        del context
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(tokens=sum(c.length for c in chunks), chunks=len(chunks), parse_seconds=sorted(parse)[1],
                      encode_seconds=sorted(encode)[1], context_shape=[2, 77 * len(chunks), TextConfig().hidden_size],
                      peak_rss_over_model_bytes=peak - before)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    import torch

    rows = []
    for items in (3, 26, 334, 1667):  # about 8, 77, 1,000 and 5,000 tokens
        done = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT)), str(items)], check=True,
                              capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['tokens']:>5} tokens, {row['chunks']:>3} chunks: parse and chunk {row['parse_seconds'] * 1e3:7.1f} ms, "
              f"encode (with an empty negative) {row['encode_seconds']:6.2f} s, peak RSS "
              f"+{row['peak_rss_over_model_bytes'] / 2**20:.0f} MiB, context {row['context_shape']}")
    result = dict(device="cpu", cpu=platform.machine(), threads=1, clock="process CPU time", torch=torch.__version__,
                  python=platform.python_version(), text_encoder="SD1.5 (ViT-L/14 text tower), float32", rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
