"""The README's sample-caption table and caption statistics for a captioning run: the first test images' decoded
captions beside their references with per-image CIDEr-D, how many captions are distinct, and how many equal one
of their references word for word.

    python experiments/caption_samples.py --workdir=/tmp/caption --step=2000 --rows=8

Reads WORKDIR/captioning_captions_stepN.json (written by the captioning evaluator) and the embedded data's test
references.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--rows", type=int, default=8)
    args = p.parse_args(argv)

    from mmjax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
    from mmjax.evaluation import captioning  # pylint: disable=import-outside-toplevel

    data = pipeline.embedded_data_config()
    texts, image_ids = sources.split_texts("easy_vqa", data.sources.easy_vqa, data)
    references: dict[int, list[str]] = {}
    for text, image_id in zip(texts, image_ids):
        references.setdefault(int(image_id), []).append(text)
    with open(os.path.join(args.workdir, f"captioning_captions_step{args.step}.json")) as f:
        captions = json.load(f)
    candidates = {str(r["image_id"]): r["caption"] for r in captions}
    per_image = captioning.cider_per_image({k: references[int(k)] for k in candidates}, candidates)
    print("| image | generated | CIDEr-D | references |\n|---|---|---|---|")
    for r in captions[:args.rows]:
        print(f"| test {r['image_id']} | {r['caption']} | {per_image[str(r['image_id'])]:.2f} | "
              f"{' / '.join(references[r['image_id']])} |")
    exact = sum(c in references[int(k)] for k, c in candidates.items()) / len(candidates)
    print(f"distinct captions: {len(set(candidates.values()))} of {len(candidates)}; equal to a reference word for "
          f"word: {100 * exact:.1f}%")


if __name__ == "__main__":
    main()
