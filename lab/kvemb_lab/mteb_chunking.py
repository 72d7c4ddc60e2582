"""Chunking on vs off on MTEB's long-document tasks (ImdbClassification, SciFact): a saved build as users get it
(``truncate``), and the same folder with ``long_inputs="chunk"`` on every side (the chunk variant measured best on
dev, ``experiments/long_documents/RULE.md``), each run by mteb's own evaluator on the local data. Held-out tasks:
reported, never chosen on. No vector cache: with ``chunk_combine="after"`` the post-processing needs every chunk.

    python experiments/long_documents/mteb_chunking.py smollm2 --folder MODELS/smollm2-kvemb --data-dir ../shared/mteb
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import kvemb_st
from kvemb_st.benchmark.local_tasks import Sampling
from kvemb_st.benchmark.run import load_tasks, run_tasks

from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.evaluation import write_json
from kvemb_lab.long_documents import with_setting
from kvemb_lab.paths import RESULTS
from kvemb_lab.provenance import public_command, public_name

CHUNK = {"long_inputs": "chunk", "chunk_weights": "tokens", "chunk_combine": "after"}
TASKS = ("ImdbClassification", "SciFact")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--folder", type=Path, required=True, help="the backbone's default build (kvemb build)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the offline MTEB copy (the team's shared/mteb)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-examples", type=int, default=1000, help="cap of each split (experiments/mteb/RULE.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "long_inputs", help="topic folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = Sampling(args.max_examples, args.seed)
    loaded = load_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.data_dir, sampling)
    out = args.out / args.backbone
    command = public_command(["python", "experiments/long_documents/mteb_chunking.py", *(argv or sys.argv[1:])])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"truncate": args.folder, "chunk": with_setting(args.folder, Path(tmp) / args.folder.name, **CHUNK)}
        for setting, folder in folders.items():
            model = kvemb_st.load(str(folder))
            summary = run_tasks(model, loaded, out / "mteb_chunking" / setting, sampling=sampling,
                                batch_size=args.batch_size, show_progress_bar=False, command=command)  # fmt: skip
            rows[setting] = {"revision": summary.revision, "scores": summary.scores}
            print(setting, summary.scores, flush=True)
    result = {"backbone": args.backbone, "folder": public_name(str(args.folder)), "chunk": CHUNK,
              "sampling": sampling.record(), "rows": rows, "command": command}  # fmt: skip
    write_json(out / f"mteb_chunking_{args.backbone}.json", result, run_assets([args.backbone], data=()))  # data: --data-dir
    return result


if __name__ == "__main__":
    main()
