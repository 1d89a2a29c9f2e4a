"""What the Hadamard on each query and key head does for a quantized KV cache: `compare` on an embedded hybrid with
`kv_bits` set, as the methods run it, then once more with that Hadamard left out (QuaRot's `rotate_queries_keys`
replaced by nothing for the second pass: an ablation only this script makes; every other transform as in the
methods). The rows of the second pass are named "METHOD, no q/k Hadamard".

    python benchmarks/kv_cache.py [--model hybrid-shakespeare] [--methods quarot,mambaquant,mambaquant+]
                                  [--bits w8a8] [--granularity token,auto] [--kv-bits 4] [--eval-samples N]
                                  [--markdown FILE]
"""

import argparse
import sys
from unittest import mock

from mambaquant.compare import compare, format_table, to_markdown
from mambaquant.methods import quarot
from mambaquant.outputs import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hybrid-shakespeare")
    parser.add_argument("--methods", default="quarot,mambaquant,mambaquant+")
    parser.add_argument("--bits", default="w8a8")
    parser.add_argument("--granularity", default="token,auto")
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--eval-samples", type=int)
    parser.add_argument("--markdown")
    args = parser.parse_args()
    options = dict(methods=args.methods, bits=args.bits, granularities=args.granularity, kv_bits=args.kv_bits,
                   eval_samples=args.eval_samples, progress=True)
    rows = compare(args.model, **options)
    with mock.patch.object(quarot, "rotate_queries_keys", lambda attention, seed: None):
        ablated = compare(args.model, **options)
    for row in ablated:
        row.method += ", no q/k Hadamard"
    print(format_table(rows + ablated))
    if args.markdown:
        command = "python benchmarks/kv_cache.py " + " ".join(sys.argv[1:])
        write_atomic(args.markdown, to_markdown(rows + ablated, command))


if __name__ == "__main__":
    main()
