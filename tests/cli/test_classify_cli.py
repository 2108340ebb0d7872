"""Sequence classification on the embedded MiniLM with real SST-2 data: train, reload in PEFT, classify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.data.classification import read_classification
from lorakit.data.formats import DataError
from lorakit.infer.classify import classify
from lorakit.models import load_tokenizer, resolve_model
from lorakit.run import run

SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
# Measured here: 0.798 dev accuracy (seed 0, one epoch over this 2,000-example slice, 40 s); 5 points of margin.
MIN_DEV_ACCURACY = 0.75


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2")
    config = RunConfig(
        model="minilm-l6",
        task="seq_cls",
        lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "key", "value", "dense"]),
        data=DataConfig(
            train_file=str(SST2 / "train.tsv"), eval_size=500, test_file=str(SST2 / "dev.tsv"), text_column="sentence",
            label_names=["negative", "positive"], max_train_examples=2000, max_length=128,
        ),
        train=TrainConfig(
            output_dir=str(out), epochs=1, batch_size=16, lr=1e-3, warmup_ratio=0.1, scheduler="linear",
            eval_strategy="epoch", save_strategy="epoch", metric_for_best="eval_accuracy", progress=False,
        ),
    )
    return run(config, echo=lambda *_: None)


@pytest.mark.slow
def test_short_run_reaches_the_measured_accuracy(sst2_run):
    from lorakit.train.objectives import classification_metrics

    dev = sst2_run["final_score"]  # GLUE dev, scored once; the checkpoint was chosen on the train slice
    assert dev["split"] == "test" and sst2_run["selection"]["source"].startswith("held out of")
    assert dev["scores"]["test_accuracy"] >= MIN_DEV_ACCURACY
    confusion = torch.tensor(dev["scores"]["confusion"])  # accuracy and macro-F1 of one evaluation
    assert int(confusion.sum()) == 872
    again = classification_metrics(confusion)
    assert (again["eval_accuracy"], again["eval_macro_f1"]) == (dev["scores"]["test_accuracy"], dev["scores"]["test_macro_f1"])
    assert sst2_run["trainable_share"] <= 0.015
    assert (Path(sst2_run["adapter"]) / "adapter_model.safetensors").stat().st_size < 2_000_000


@pytest.mark.slow
def test_peft_reload_gives_the_same_probabilities(sst2_run):
    from lorakit.cli.classify import load_classifier

    texts = ["a gorgeous , witty , seductive movie .", "a dull , lifeless mess .", "it 's fine ."]
    model, tokenizer, labels, _ = load_classifier("minilm-l6", sst2_run["adapter"])
    ours = torch.tensor([[r["probabilities"][n] for n in labels] for r in classify(model, tokenizer, texts, labels)])

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, sst2_run["adapter"]).eval()
    enc = load_tokenizer("minilm-l6")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model(**enc).logits.softmax(-1)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_interactive_answers_each_non_empty_line_and_exits_at_eof(sst2_run):
    lines = "a gorgeous , witty movie\n\na dull mess\n   ???  \nthe best film of the year\n"
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "classify", "--model", "minilm-l6", "--adapter", sst2_run["adapter"],
         "--interactive"],
        input=lines, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.strip().splitlines()
    assert len(answers) == 4
    assert all(a.split("\t")[0] in ("negative", "positive") and 0.5 <= float(a.split("\t")[1]) <= 1 for a in answers)


@pytest.mark.parametrize(
    "train_rows, dev_rows, message",
    [
        ("good film\t1\nbad film\t0\n", "fine film\t2\n", r"dev.tsv:2: label '2' was not seen in the training data \(known: 0, 1\)"),
        ("good film\t1\n \t0\n", "fine\t1\n", r"train.tsv:3: column 'sentence' is empty"),
        ("good film\t1\n", None, None),
    ],
)
def test_bad_rows_name_the_row(tmp_path, train_rows, dev_rows, message):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + train_rows)
    if dev_rows is None:  # a missing column
        (tmp_path / "train.tsv").write_text("text\tlabel\ngood film\t1\n")
        dev_rows, message = "x\t1\n", r"train.tsv:2: column 'sentence' is missing \(have: text, label\)"
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + dev_rows)
    config = DataConfig(train_file=str(tmp_path / "train.tsv"), eval_file=str(tmp_path / "dev.tsv"), text_column="sentence")
    with pytest.raises(DataError, match=message):
        train, dev, labels = read_classification(config, seed=0)
        from lorakit.data.classification import tokenize_classification

        tokenize_classification(load_tokenizer("minilm-l6"), dev, config, labels)


@pytest.mark.slow
def test_batch_mode_writes_label_and_probability_beside_each_record(sst2_run, tmp_path):
    import json

    rows = [{"text": "a gorgeous , witty movie", "id": 1}, {"text": "a dull , lifeless mess", "id": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run(
        [sys.executable, "-m", "lorakit", "classify", "--model", "minilm-l6", "--adapter", sst2_run["adapter"],
         "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
        check=True, capture_output=True, timeout=300,
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2] and all(0.5 <= r["probability"] <= 1 for r in out)
    assert [r["label"] for r in out] == ["positive", "negative"]


def test_macro_f1_leaves_out_a_class_neither_labelled_nor_predicted():
    import torch

    from lorakit.train.objectives import classification_metrics

    scores = classification_metrics(torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]]))  # as scikit-learn averages
    assert (scores["eval_accuracy"], scores["eval_macro_f1"]) == (1.0, 1.0)
    assert classification_metrics(torch.tensor([[5, 0], [5, 0]]))["eval_macro_f1"] == pytest.approx(1 / 3)


def test_labels_of_non_ascii_digits_are_text():
    from lorakit.config import DataConfig
    from lorakit.data.classification import label_set

    labels = label_set([{"label": "1"}, {"label": "²"}, {"label": "10"}], DataConfig())
    assert labels.values == ["1", "10", "²"]  # sorted as text: '²' is no integer


def test_one_numeric_label_written_two_ways_is_refused_by_row():
    from lorakit.config import DataConfig
    from lorakit.data.classification import label_set
    from lorakit.data.formats import DataError

    records = [{"label": 1, "_source": "t.jsonl", "_line": 1}, {"label": "01", "_source": "t.jsonl", "_line": 2}]
    with pytest.raises(DataError, match=r"^t.jsonl:2: column 'label' holds '01' where t.jsonl:1 holds '1', one "
                                        r"number written two ways"):
        label_set(records, DataConfig())
