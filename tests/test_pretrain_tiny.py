"""`imatch pretrain-tiny`: a short swift sft pretraining run end to end on the CPU, the same command
writes the same bytes, Qwen2.5-VL's filler rows stay exactly zero (hook, AdamW, weight decay), and
the packed file unpacks to exactly the trained weights and loads through the scoring loader."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from imatch import archs, backbone, cli, integrity, pretrain_corpus, pretrain_tiny, score
from imatch.errors import InputError

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained"
SHORT = ["--steps", "3", "--batch-size", "2", "--logging-steps", "1", "--threads", "1", "--max-length", "512"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    pretrain_corpus.generate(out, seed=5, n_scenes=4, image_size=64)
    return out


def _run(args: list[str]) -> None:
    assert cli.main(args) == 0


def _weights(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file, the run record and the seal included."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_same_command_writes_the_same_bytes_and_the_weights_move(corpus, tmp_path):
    """The file to ship is the same bytes when the command runs again, from another folder, with the
    corpus elsewhere (the record names no path and no time): what `make` regenerates can be compared
    with what is shipped."""
    outs, packs = [], []
    for k in range(2):
        source = corpus if k == 0 else shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
        out, packed = tmp_path / f"run{k}" / "bb", tmp_path / f"run{k}" / "bb.zip"
        _run(["pretrain-tiny", "--arch", "internvl", "--corpus", str(source), "--out", str(out), *SHORT,
              "--pack", str(packed)])
        outs.append(out)
        packs.append(packed.read_bytes())
    assert _files(outs[0]) == _files(outs[1])
    assert packs[0] == packs[1]
    record = json.loads((outs[0] / pretrain_tiny.RECORD).read_text())
    assert [row["step"] for row in record["loss_curve"]] == [1, 2, 3]
    assert record["filler_rows"] is None  # InternVL's vocabulary has no fillers
    # a CPU run records what the shipped files record, no more (so `make pretrained` can write their bytes)
    with zipfile.ZipFile(SHIPPED / "tiny-internvl.zip") as zf:
        shipped = json.loads(zf.read(pretrain_tiny.RECORD))
    assert set(record) == set(shipped) and set(record["recipe"]) == set(shipped["recipe"])
    # trained: not the random build of the same seed
    random = tmp_path / "random"
    archs.get("internvl").build(random, size="tiny", seed=0)
    assert _weights(random) != _weights(outs[0])


def test_the_hook_keeps_filler_rows_at_zero_under_adamw_with_weight_decay():
    """The mechanism on a tied embedding: without the hook AdamW moves the zero rows (so the
    check can fail), with it they stay exactly zero while the other rows train."""
    for hooked in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Module()
        emb = torch.nn.Embedding(50, 8)
        model.get_input_embeddings = lambda: emb
        model.get_output_embeddings = lambda: None
        rows = (10, 40)
        pretrain_tiny.zero_fillers(model, rows)
        if hooked:
            pretrain_tiny.keep_fillers_at_zero(model, rows)
        opt = torch.optim.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
        before = emb.weight.detach().clone()
        for _ in range(5):
            h = emb(torch.tensor([[1, 2, 3, 45]]))
            logits = h @ emb.weight.T  # tied output layer: every row gets a gradient
            torch.nn.functional.cross_entropy(logits[0], torch.tensor([2, 3, 45, 1])).backward()
            opt.step()
            opt.zero_grad()
        assert pretrain_tiny.fillers_are_zero(model, rows) == hooked
        assert not torch.equal(emb.weight[:10], before[:10])  # the reachable rows did train


def test_qwen_fillers_stay_zero_and_the_packed_file_loads_as_trained(corpus, tmp_path):
    out, packed = tmp_path / "qwen", tmp_path / "ship" / "qwen.zip"
    packed.parent.mkdir()
    integrity.seal(packed.parent)  # sealed before the file came: it is not listed
    _run(["pretrain-tiny", "--arch", "qwen2_5_vl", "--corpus", str(corpus), "--out", str(out), *SHORT,
          "--pack", str(packed), "--keep-scratch"])
    record = json.loads((out / pretrain_tiny.RECORD).read_text())
    start, stop = record["filler_rows"]
    assert stop == 151643 and 0 < start < 2000
    assert record["filler_check"] == {"rows": [start, stop], "steps_hooked": 3, "zero_at_end": True}
    # small enough to ship, although the folder holds the 151,665-row embedding
    assert packed.stat().st_size < 5_000_000 < sum(p.stat().st_size for p in out.iterdir())
    unpacked = tmp_path / "unpacked"
    # shipped files are sealed by their folder's manifest: an unlisted file is refused, by name
    with pytest.raises(InputError, match=r"qwen\.zip.*not listed"):
        backbone.pretrained_backbone(packed, unpacked)
    integrity.seal(packed.parent)
    assert cli.main(["pretrained-backbone", "--packed", str(packed), "--out", str(unpacked)]) == 0
    arch = archs.get("qwen2_5_vl")
    loaded, *_ = score.load(unpacked, arch, device="cpu", dtype="float32", max_pixels=16384, varlen=False)
    trained, *_ = score.load(tmp_path / "qwen.scratch" / "train" / "checkpoint-3", arch, device="cpu",
                             dtype="float32", max_pixels=16384, varlen=False, allow_unsealed=True)
    random = tmp_path / "random"
    arch.build(random, size="tiny", seed=0)
    a, b = loaded.state_dict(), trained.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    embedding = loaded.get_input_embeddings().weight
    assert embedding.shape[0] == 151665 and not embedding[start:stop].any() and embedding[:start].any()
    # trained reachable rows moved from the random build's
    from safetensors.torch import load_file

    built = {k: v for k, v in load_file(random / "model.safetensors").items() if "embed_tokens" in k}
    assert not torch.equal(next(iter(built.values()))[:start], embedding[:start])


def test_bad_corpus_and_type_are_named(tmp_path, corpus, capsys):
    assert cli.main(["pretrain-tiny", "--arch", "internvl", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a pretraining corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain-tiny", "--arch", "internvl", "--corpus", str(corpus), "--out", str(tmp_path / "o"),
                  "--types", "colours"])
    assert exc.value.code == 2 and "invalid choice: 'colours'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_shipped_file_that_differs_from_its_manifest_is_refused_by_name(tmp_path):
    """A packed backbone whose bytes changed after its folder was sealed (a bad copy, an edit, a
    regenerated file not resealed) stops the backbone job with the file's name; the folder is not
    written."""
    folder = tmp_path / "bb"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    integrity.seal(folder)
    ship = tmp_path / "pretrained"
    ship.mkdir()
    packed = ship / "tiny-x.zip"
    backbone.pack(folder, packed)
    first = packed.read_bytes()
    backbone.pack(folder, ship / "again.zip")
    assert (ship / "again.zip").read_bytes() == first  # deterministic bytes
    (ship / "again.zip").unlink()
    integrity.seal(ship)
    backbone.pretrained_backbone(packed, tmp_path / "ok")
    assert (tmp_path / "ok" / "config.json").read_text() == "{}"
    packed.write_bytes(first[:-1] + bytes([first[-1] ^ 1]))
    with pytest.raises(InputError, match=r"tiny-x\.zip.*sha256 differs"):
        backbone.pretrained_backbone(packed, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_the_shipped_backbones_match_their_manifest_are_small_and_say_what_made_them(tmp_path):
    """pretrained/ (the embedded default's `source: pretrained`): every file listed in its manifest
    with the bytes recorded there, nothing unlisted, each packed backbone at most 25 MB, and each
    one, unpacked, a sealed backbone of its architecture pretrained by `make pretrained`'s recipe."""
    folder = SHIPPED
    assert integrity.verify(folder, required=True) == 4  # the three backbones and the README
    # the corpus they say they were pretrained on is the one `make pretrained` writes today
    corpus = tmp_path / "corpus"
    pretrain_corpus.generate(corpus, seed=1, n_scenes=2000)
    made = json.loads((corpus / "summary.json").read_text())["sha256"]
    for arch, steps in (("internvl", 4000), ("ovis2", 4000), ("qwen2_5_vl", 1500)):
        packed = folder / f"tiny-{arch}.zip"
        assert packed.stat().st_size <= 25_000_000
        out = tmp_path / arch
        backbone.pretrained_backbone(packed, out)
        info = json.loads((out / "imatch-backbone.json").read_text())
        assert info == {"arch": arch, "size": "tiny", "seed": 0, "random_weights": False, "pretrained": pretrain_tiny.RECORD}
        record = json.loads((out / pretrain_tiny.RECORD).read_text())
        assert record["pretrained_on"]["corpus_seed"] == 1 and record["pretrained_on"]["corpus_scenes"] == 2000
        assert record["pretrained_on"]["corpus_sha256"] == made, arch
        assert record["recipe"]["steps"] == steps and record["recipe"]["threads"] == 2
        assert record["loss_curve"][-1]["step"] == steps
        assert record["loss_curve"][-1]["loss"] < 0.5 * record["loss_curve"][0]["loss"]
