"""`mmjax_vqa`: a TFDS builder for VQA data in the VQAv2 file format, offline (VQAv2 itself, or yours).

    splits = {"train": dict(questions="v2_OpenEnded_mscoco_train2014_questions.json",
                            annotations="v2_mscoco_train2014_annotations.json", images="train2014"),
              "validation": dict(questions=..., annotations=..., images="val2014")}
    path = build_vqa(splits, "my_data/tfds")
    ds = tfds.builder_from_directory(path).as_dataset(split="validation")

or `python -m mmjax.data.build vqa --train=Q.json,A.json,IMAGE_DIR --validation=... --out=...`.

Files per split (the VQAv2 formats; other keys are ignored):

* questions json: `{"questions": [{"image_id": int, "question": str, "question_id": int}, ...],
  "data_subtype": "train2014"}` (`data_subtype` is only needed by the default image pattern);
* annotations json (optional, e.g. for a test split): `{"annotations": [{"question_id": int, "image_id": int,
  "answers": [{"answer": str, "answer_confidence": str, "answer_id": int}, ... (10 in VQAv2)],
  "multiple_choice_answer": str, "answer_type": str, "question_type": str}, ...]}`; `question_id`,
  `image_id`, the `answer`s and the (optional) types are read; annotations of questions not in the questions file are ignored;
* an image folder + `image_pattern`, a str.format pattern over `image_id` and `coco_split` (= the questions
  file's `data_subtype`). Default "COCO_{coco_split}_{image_id:012d}.jpg", VQAv2/COCO's names; e.g.
  "{image_id}.png" for easy-vqa. Images must be JPEG, PNG or BMP and are fully decoded with PIL at build time.

Answers are normalised as the official VQA evaluation (vqaEval.py) does, always (the official code skips it when
all 10 answers are equal, which changes nothing for the vocabulary): newlines/tabs -> spaces and strip,
`processPunctuation` (drop `;/[]"{}()=+\\_-><@`,?!` if a punctuation mark is next to a space or the text has a
digit-comma-digit, else turn it into a space; drop periods not followed by a digit) and `processDigitArticle`
(lowercase, number words zero..ten and "none" -> digits, drop the articles a/an/the, then the official
contraction table, e.g. "dont" -> "don't"; reproduced in full below, including its entries that can never match
after lowercasing). "Two" -> "2", "the dog." -> "dog", "yes!" -> "yes".

Answer vocabulary: the `vocab_size` (default 3129, VQAv2's standard size) most frequent normalised answers over
the "train" split's annotations, counting every annotator's answer (ties: alphabetical; empty answers never
enter). Saved as `answer_vocab.json`, a JSON list whose index is the class id; pass `answer_vocab=` a file of the
same form (e.g. from an earlier build) to use it instead; its entries are matched against normalised answers.

Soft targets per question, for each in-vocabulary answer a given by the annotators: score(a) = min(#annotators who
gave a / 3, 1), the usual approximation of the VQA accuracy. Out-of-vocabulary answers are dropped (counted; the
build summary reports the vocabulary's coverage per split).

Features of one example (= one question; written in questions-file order, so an image is stored once per
question about it):

* `image` (the file's bytes, decoded to uint8 [H, W, 3] when read), `image_id` int64, `question_id` int64,
  `question` Text;
* `answers`: Sequence(Text), the normalised annotator answers (empty without annotations); `raw_answers` the same
  answers as the annotation file gives them (the official evaluator compares predictions with these),
  `answer_type` and `question_type` ("" where the annotations have none);
* `answer_ids` Sequence(int32) and `answer_scores` Sequence(float32): parallel, the distinct in-vocabulary
  answers in class-id order and their soft scores.

Bad questions of every split are listed in one ValueError (as image_text does: its first line counts them, then
the first 20 per split in file order, the questions file's before the annotations'), each naming the file,
question_id, image_id and offending value: missing / corrupt / unsupported image, question without annotation,
malformed question or annotation entry (missing key, wrong type, duplicate question_id, image_id disagreeing with
the question's); an unreadable json file or one without its "questions" / "annotations" list, and an empty split,
always raise. `skip_bad=True` skips bad questions instead, counted per reason per split, listed the same way in the
summary (logged and printed) and written to `skipped.json` as
{split: {"counts": {reason: n}, "question_ids": {reason: [...]}, ...}} (an entry without an integer question_id
is listed as "questions[i]" / "annotations[i]", its 0-based position).

Prepared dataset directory `<out_dir>/mmjax_vqa/<name>/1.0.0/`: `dataset_info.json`, `features.json`,
`mmjax_vqa-<split>.tfrecord-*` files, `answer_vocab.json`, the default WordPiece tokenizer trained on the train
questions (`tokenizer.json` + `vocab.txt`) and, with `skip_bad`, `skipped.json`. Records are deterministic (see
`image_text`). Building again under the same name replaces the dataset.

`write_easy_vqa_as_vqav2` writes the `easy-vqa` package's data in this format, so it goes through the same code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import tempfile
from typing import Iterable, Iterator, Sequence

from mmjax.data import image_text as it  # first: it sets TF_CPP_MIN_LOG_LEVEL before TF loads
from mmjax.data.local_builder import LocalBuilder
from mmjax.evaluation.vqa import normalize_answer

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

DEFAULT_IMAGE_PATTERN = "COCO_{coco_split}_{image_id:012d}.jpg"
DEFAULT_VOCAB_SIZE = 3129

# ----------------------------------------------------------------------------------------------- vocabulary


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[str]:
    """The `vocab_size` most frequent (normalised) answers over all annotators; ties alphabetical."""
    counts = collections.Counter(a for answers in answer_lists for a in answers if a)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:vocab_size]]


def load_answer_vocab(path: str) -> list[str]:
    """A JSON list of distinct non-empty answer strings (index = class id)."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read answer vocabulary {path}: {e}") from None
    if not isinstance(vocab, list) or not all(isinstance(a, str) and a for a in vocab):
        raise ValueError(f"answer vocabulary {path} must be a JSON list of non-empty strings")
    if len(set(vocab)) != len(vocab):
        dupes = sorted(a for a, n in collections.Counter(vocab).items() if n > 1)
        raise ValueError(f"answer vocabulary {path} has duplicates: {dupes[:5]}")
    if not vocab:
        raise ValueError(f"answer vocabulary {path} is empty")
    return vocab


def soft_scores(answers: Sequence[str], vocab_index: dict[str, int]) -> tuple[list[int], list[float]]:
    """(class ids ascending, scores min(n / 3, 1)) of the in-vocabulary answers among `answers`."""
    counts = collections.Counter(a for a in answers if a in vocab_index)
    ids = sorted(vocab_index[a] for a in counts)
    by_id = {vocab_index[a]: n for a, n in counts.items()}
    return ids, [min(by_id[i] / 3.0, 1.0) for i in ids]


# ----------------------------------------------------------------------------------------------- reading


def _load_json_list(path: str, key: str) -> tuple[dict, list]:
    """(the whole json object, its `key` list); unreadable files or a missing list always raise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list")
    return data, data[key]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _where(entry, kind: str, index: int) -> int | str:
    """How a skipped entry is listed: its question_id, else "<kind>[index]"."""
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return qid if _is_int(qid) else f"{kind}[{index}]"


@dataclasses.dataclass
class SplitPlan:
    """One split's validated questions, ready to write."""

    examples: list[dict]  # image_id, question_id, question, image (path), answers (normalised)
    has_answers: bool
    report: it.SkipReport


_SPLIT_KEYS = ("questions", "annotations", "images", "image_pattern")


def plan_split(split: str, files: dict, skip_bad: bool) -> SplitPlan:
    """Reads and validates one split's questions, annotations and images; raises ValueError on bad input."""
    unknown = set(files) - set(_SPLIT_KEYS)
    if unknown or "questions" not in files or "images" not in files:
        raise ValueError(f"split {split!r}: expected keys questions, images[, annotations, image_pattern], got "
                         f"{sorted(files)}")
    questions_path, images = files["questions"], files["images"]
    annotations_path = files.get("annotations") or None
    pattern = files.get("image_pattern") or DEFAULT_IMAGE_PATTERN
    if not os.path.isdir(images):
        raise ValueError(f"split {split!r}: image folder not found: {images}")
    data, questions = _load_json_list(questions_path, "questions")
    report = it.SkipReport(source=questions_path, skip_bad=skip_bad, item="question_id")

    by_qid: dict[int, dict] = {}
    # Bad entries are listed in file order: the questions file's (by question position), then the annotations'.
    position: dict[int, tuple[int, int]] = {}  # question_id -> (0, its index in the questions file)
    for index, q in enumerate(questions):
        report.seen += 1
        where = _where(q, "questions", index)
        ok = (isinstance(q, dict) and _is_int(q.get("question_id")) and _is_int(q.get("image_id"))
              and isinstance(q.get("question"), str) and q["question"].strip())
        if not ok:
            report.bad("bad_question", where, f"{questions_path}: questions[{index}] needs an int question_id, an "
                                              f"int image_id and a non-empty question string, got {q!r}", (0, index))
        elif q["question_id"] in by_qid:
            report.bad("bad_question", where, f"{questions_path}: questions[{index}]: duplicate question_id "
                                              f"{q['question_id']}", (0, index))
        else:
            by_qid[q["question_id"]] = {"question_id": q["question_id"], "image_id": q["image_id"],
                                        "question": q["question"].strip()}
            position[q["question_id"]] = (0, index)

    if annotations_path is not None:
        by_qid = _attach_answers(by_qid, annotations_path, questions_path, report, position)

    if "{coco_split}" in pattern and not isinstance(data.get("data_subtype"), str):
        raise ValueError(f"{questions_path} has no 'data_subtype' for the image pattern {pattern!r}; pass "
                         f"image_pattern=, e.g. 'COCO_train2014_{{image_id:012d}}.jpg'")

    def image_path(image_id: int) -> str:
        try:
            name = pattern.format(image_id=image_id, coco_split=data.get("data_subtype"))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"split {split!r}: bad image_pattern {pattern!r} ({type(e).__name__}: {e}); fields: "
                             "image_id, coco_split") from None
        return os.path.join(images, name)

    image_ids = sorted({ex["image_id"] for ex in by_qid.values()})
    paths = {i: image_path(i) for i in image_ids}
    problems = dict(zip(image_ids, it.parallel_map(lambda i: it.check_image(paths[i]), image_ids)))
    examples = []
    for ex in by_qid.values():  # questions-file order
        problem = problems[ex["image_id"]]
        if problem is not None:
            report.bad(problem.reason, ex["question_id"], f"{questions_path}: question_id {ex['question_id']} "
                                                          f"(image_id {ex['image_id']}): {problem}",
                       position[ex["question_id"]])
        else:
            examples.append(dict(ex, image=paths[ex["image_id"]]))
    report.check()  # every bad question at once, in file order (unless skipping them)
    if not examples:
        raise ValueError(f"split {split!r}: no valid questions; {report.summary()}")
    return SplitPlan(examples=examples, has_answers=annotations_path is not None, report=report)


def _attach_answers(by_qid: dict[int, dict], annotations_path: str, questions_path: str,
                    report: it.SkipReport, position: dict[int, tuple[int, int]]) -> dict[int, dict]:
    """The questions that have a valid annotation, with their normalised `answers`; the rest go to `report`."""
    _, annotations = _load_json_list(annotations_path, "annotations")
    answers: dict[int, list[str]] = {}
    bad: set[int] = set()
    for index, a in enumerate(annotations):
        qid = a.get("question_id") if isinstance(a, dict) else None
        if _is_int(qid) and qid not in by_qid:
            continue  # an annotation of a question we don't have (or skipped): nothing to attach it to
        prefix = f"{annotations_path}: annotations[{index}]"
        ok = (isinstance(a, dict) and _is_int(qid) and _is_int(a.get("image_id"))
              and isinstance(a.get("answers"), list) and a["answers"]
              and all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]))
        if not ok:
            report.bad("bad_annotation", _where(a, "annotations", index),
                       f"{prefix} needs an int question_id, an int image_id and a non-empty 'answers' list of "
                       f"{{'answer': str}}, got {json.dumps(a)[:300]}", (1, index))
            if _is_int(qid):
                bad.add(qid)
        elif qid in answers:
            report.bad("bad_annotation", qid, f"{prefix}: second annotation for question_id {qid}", (1, index))
            bad.add(qid)
        elif a["image_id"] != by_qid[qid]["image_id"]:
            report.bad("bad_annotation", qid, f"{prefix}: question_id {qid} has image_id {a['image_id']}, its "
                                              f"question has image_id {by_qid[qid]['image_id']}", (1, index))
            bad.add(qid)
        else:
            answers[qid] = dict(answers=[normalize_answer(x["answer"]) for x in a["answers"]],
                                raw_answers=[x["answer"] for x in a["answers"]],
                                answer_type=str(a.get("answer_type", "")),
                                question_type=str(a.get("question_type", "")))
    kept = {}
    for qid, ex in by_qid.items():
        if qid in bad:
            continue  # already reported
        if qid not in answers:
            report.bad("missing_annotation", qid, f"{questions_path}: question_id {qid} (image_id "
                                                  f"{ex['image_id']}) has no annotation in {annotations_path}",
                       position[qid])
        else:
            kept[qid] = dict(ex, **answers[qid])
    return kept


# ----------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class VqaConfig(tfds.core.BuilderConfig):
    """The files of each split and how to build them (the config name names the dataset)."""

    splits: dict = dataclasses.field(default_factory=dict)  # split -> {questions, annotations, images, pattern}
    vocab_size: int = DEFAULT_VOCAB_SIZE
    answer_vocab: str | None = None
    skip_bad: bool = False
    tokenizer_vocab_size: int = 8000


@dataclasses.dataclass
class Plan:
    """All splits validated, plus the answer vocabulary."""

    splits: dict[str, SplitPlan]
    vocab: list[str]


def plan_vqa(config: VqaConfig) -> Plan:
    """Reads and validates every split of `config` and makes (or loads) the answer vocabulary."""
    if not config.splits:
        raise ValueError("no splits given")
    for split in config.splits:
        if not re.match(r"^[A-Za-z0-9_]+$", split) or split.lower() == "all":
            raise ValueError(f"bad split name {split!r} (letters, digits and _; not 'all')")
    splits, bad = {}, []
    for split, files in config.splits.items():
        try:
            splits[split] = plan_split(split, files, config.skip_bad)
        except it.BadRows as e:  # planned on: one error lists the bad questions of every split
            bad += e.reports
    if bad:
        raise it.BadRows(bad)
    if config.answer_vocab:
        vocab = load_answer_vocab(config.answer_vocab)
    elif "train" in splits and splits["train"].has_answers:
        vocab = build_answer_vocab((ex["answers"] for ex in splits["train"].examples), config.vocab_size)
    else:
        raise ValueError("the answer vocabulary comes from a 'train' split with annotations; add one or pass "
                         "answer_vocab=FILE")
    if not vocab:
        raise ValueError("the train annotations have no non-empty answer: empty answer vocabulary")
    return Plan(splits=splits, vocab=vocab)


def coverage(examples: Sequence[dict], vocab_index: dict[str, int]) -> str:
    """How much of a split's annotator answers / questions the vocabulary covers."""
    answers = [a for ex in examples for a in ex["answers"]]
    if not answers:
        return "no answers"
    inside = sum(a in vocab_index for a in answers)
    questions = sum(any(a in vocab_index for a in ex["answers"]) for ex in examples)
    return (f"{inside}/{len(answers)} annotator answers in the vocabulary ({inside / len(answers):.1%}; "
            f"{len(answers) - inside} out-of-vocabulary dropped), {questions}/{len(examples)} questions with an "
            f"in-vocabulary answer")


class MmjaxVqa(LocalBuilder):
    """VQA questions with normalised answers and soft scores from VQAv2-format files; pass config=VqaConfig(...)."""

    def _make_plan(self) -> Plan:
        if not isinstance(self.builder_config, VqaConfig):
            raise ValueError("MmjaxVqa needs config=VqaConfig(name=..., splits={...})")
        return plan_vqa(self.builder_config)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="VQA questions + answers from VQAv2-format files (see mmjax/data/vqa.py).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "image_id": np.int64,
                "question_id": np.int64,
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "raw_answers": tfds.features.Sequence(tfds.features.Text()),
                "answer_type": tfds.features.Text(),
                "question_type": tfds.features.Text(),
                "answer_ids": tfds.features.Sequence(np.int32),
                "answer_scores": tfds.features.Sequence(np.float32),
            }),
            disable_shuffling=True,  # questions-file order: reproducible files
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk
        return {split: self._generate_examples(split) for split in self.plan().splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        plan = self.plan()
        vocab_index = {a: i for i, a in enumerate(plan.vocab)}
        for ex in plan.splits[split].examples:
            answers = ex.get("answers", [])
            ids, scores = soft_scores(answers, vocab_index)
            yield ex["question_id"], {
                "image": ex["image"],  # a path: stored as the file's bytes
                "image_id": ex["image_id"],
                "question_id": ex["question_id"],
                "question": ex["question"],
                "answers": answers,
                "raw_answers": ex.get("raw_answers", []),
                "answer_type": ex.get("answer_type", ""),
                "question_type": ex.get("question_type", ""),
                "answer_ids": np.asarray(ids, np.int32),
                "answer_scores": np.asarray(scores, np.float32),
            }

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        plan = self.plan()
        with it.deterministic_serialization():
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_dir is the temporary build dir here; tfds renames it into place only if we succeed.
        config = self.builder_config
        it.write_json(os.path.join(self.data_dir, "answer_vocab.json"), plan.vocab)
        if config.tokenizer_vocab_size:
            from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=import-outside-toplevel

            texts_from = ["train"] if "train" in plan.splits else list(plan.splits)
            train_wordpiece([ex["question"] for s in texts_from for ex in plan.splits[s].examples], self.data_dir,
                            vocab_size=config.tokenizer_vocab_size)
        if config.skip_bad:
            it.write_json(os.path.join(self.data_dir, "skipped.json"),
                          {s: p.report.to_json() for s, p in plan.splits.items()})
        vocab_index = {a: i for i, a in enumerate(plan.vocab)}
        lines = [f"{self.name}/{config.name}: answer vocabulary of {len(plan.vocab)}"]
        for split, sp in plan.splits.items():
            cover = coverage(sp.examples, vocab_index) if sp.has_answers else "no annotations"
            lines.append(f"  {split}: {len(sp.examples)} questions; {cover}; {sp.report.summary()}")
        summary = "\n".join(lines)
        logging.info(summary)
        print(summary)


def build_vqa(splits: dict[str, dict], out_dir: str, *, name: str = "vqa", vocab_size: int = DEFAULT_VOCAB_SIZE,
              answer_vocab: str | None = None, skip_bad: bool = False, tokenizer_vocab_size: int = 8000,
              file_format: str = "tfrecord", num_shards: int | None = None) -> str:
    """Builds (or rebuilds) `mmjax_vqa/<name>` under `out_dir` from VQAv2-format files; returns the prepared dir.

    `splits` maps a split name to dict(questions=, annotations= (optional), images=, image_pattern= (optional));
    `file_format` and `num_shards` as in `image_text.build_image_text`.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if tokenizer_vocab_size < 0:
        raise ValueError(f"tokenizer_vocab_size must be >= 0, got {tokenizer_vocab_size}")

    def absolute(files: dict) -> dict:
        return {k: (os.path.abspath(v) if k in ("questions", "annotations", "images") and v else v)
                for k, v in files.items()}

    config = VqaConfig(
        name=it.sanitize_name(name), splits={s: absolute(dict(f)) for s, f in splits.items()},
        vocab_size=int(vocab_size), answer_vocab=os.path.abspath(answer_vocab) if answer_vocab else None,
        skip_bad=skip_bad, tokenizer_vocab_size=int(tokenizer_vocab_size))
    builder = MmjaxVqa(config=config, data_dir=out_dir, file_format=it.check_file_format(file_format))
    builder.plan()  # validate everything before tfds creates any directory
    return it.prepare(builder, num_shards=num_shards)


# ----------------------------------------------------------------------------------------------- easy-vqa


def write_easy_vqa_as_vqav2(out_dir: str, split: str = "train", limit: int | None = None) -> dict:
    """Writes the `easy-vqa` package's `split` ("train" / "test") as VQAv2 files; returns its `build_vqa` split dict.

    easy-vqa has one answer per question: it is written as 10 identical annotator answers, so its soft score is
    1.0. question_id = the question's index in the package's file; `limit` keeps the first `limit` questions. The
    images stay in the package's folder (pattern "{image_id}.png"). Writes `<out_dir>/easy_vqa_<split>_questions.json`
    and `..._annotations.json`.
    """
    import easy_vqa  # pylint: disable=import-outside-toplevel

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-vqa has the splits train and test, not {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    n = len(texts) if limit is None else min(limit, len(texts))
    questions, annotations = [], []
    for qid in range(n):
        image_id, answer = int(image_ids[qid]), answers[qid]
        questions.append({"image_id": image_id, "question": texts[qid], "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_id,
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
            "multiple_choice_answer": answer, "answer_type": "yes/no" if answer in ("yes", "no") else "other",
            "question_type": "none of the above",
        })
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "questions": os.path.join(out_dir, f"easy_vqa_{split}_questions.json"),
        "annotations": os.path.join(out_dir, f"easy_vqa_{split}_annotations.json"),
        "images": os.path.dirname(image_paths[int(image_ids[0])]),
        "image_pattern": "{image_id}.png",
    }
    subtype = f"easy_vqa_{split}"
    it.write_json(files["questions"], {"data_subtype": subtype, "questions": questions})
    it.write_json(files["annotations"], {"data_subtype": subtype, "annotations": annotations})
    return files


class EasyVqaQuestions(MmjaxVqa):
    """The `easy-vqa` package's questions (13 answers) in this builder's format, built offline on first use: the
    embedded VQA data. Source name `easy_vqa_questions`, splits train (38,575 questions on 4,000 images) and test
    (9,673 on 1,000); the images are the embedded dataset's. Its tokenizer is the embedded dataset's (the same
    corpus, trained the same way: the same ids), so a model pretrained on easy_vqa_captions reads its questions
    with the words it learned."""

    BUILDER_CONFIGS = [VqaConfig(name="default", tokenizer_vocab_size=0)]

    def _info(self) -> tfds.core.DatasetInfo:
        # Beside the VQA features, each image's object box and class from the embedded dataset, so region models
        # (UNITER, ViLBERT) get regions made from the pixels (a source's regions_from_boxes).
        from mmjax.data import easy_vqa_captions  # pylint: disable=import-outside-toplevel

        info = super()._info()
        features = dict(info.features)
        features.update(bbox=tfds.features.BBoxFeature(),
                        label=tfds.features.ClassLabel(names=easy_vqa_captions.CLASS_NAMES))
        return tfds.core.DatasetInfo(builder=self, description=info.description,
                                     features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _images(self, split: str) -> list[dict]:
        """The embedded dataset's measured examples of `split` (measured once per build: ~5 s per 1,000)."""
        from mmjax.data import easy_vqa_captions  # pylint: disable=import-outside-toplevel

        cache = self.__dict__.setdefault("_images_cache", {})
        if split not in cache:
            cache[split] = easy_vqa_captions.load_split_examples(split)
        return cache[split]

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        objects = {ex["image_id"]: ex for ex in self._images(split)}  # the questions' images, by id
        for key, example in super()._generate_examples(split):
            image = objects[example["image_id"]]
            yield key, dict(example, bbox=image["bbox"], label=image["label"])

    def _make_plan(self) -> Plan:
        files = tempfile.mkdtemp(prefix="easy_vqa_questions_")  # VQAv2-format json, then built as any other
        splits = {"train": write_easy_vqa_as_vqav2(files, "train"), "test": write_easy_vqa_as_vqav2(files, "test")}
        return plan_vqa(dataclasses.replace(self.builder_config, splits=splits))

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        from mmjax.data import easy_vqa_captions  # pylint: disable=import-outside-toplevel
        from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=import-outside-toplevel

        train_wordpiece(easy_vqa_captions.tokenizer_corpus(self._images("train")), self.data_dir)
        self.__dict__.pop("_images_cache", None)  # ~60 MB of decoded images


def easy_vqa_source_config(**overrides):
    """The embedded VQA questions as a data source (kind "vqa", eval split test, held in memory); keyword
    arguments override source fields."""
    from mmjax import configlib  # pylint: disable=import-outside-toplevel
    from mmjax.data import sources  # pylint: disable=import-outside-toplevel

    defaults = dict(name="easy_vqa_questions", kind="vqa", prepare=True, eval_split="test", id_key="image_id",
                    label_key="label", regions_from_boxes=dict(box_key="bbox", crop=8, grid=2), in_memory=True)
    return configlib.override(sources.source_config(**defaults), overrides, "the easy_vqa_questions source")
