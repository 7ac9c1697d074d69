"""`imatch score` / `imatch.Scorer` inputs: every row checked before a model loads, named errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from imatch.errors import InputError
from imatch.predict import read_prompts
from imatch.scorer import check_inputs


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 24), colour).save(images / name)
    (images / "fake.png").write_text("not an image")
    Image.new("I;16", (32, 24), 40000).save(images / "deep.png")  # 16-bit: near-white once converted to RGB
    return images


def _cli(imatch, folder, rows, tmp_path, suffix=".csv"):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    # --models names nothing: an input error must come first, before any model is looked at
    return imatch("score", "--images", folder, "--prompts", path, "--models", tmp_path / "no-models",
                  "--out", tmp_path / "out")


@pytest.mark.parametrize("rows, message", [
    ([{"image": "a.png", "prompt": ""}], "row 0: empty prompt"),
    ([{"image": "a.png", "prompt": "a car"}, {"image": "fake.png", "prompt": "a cat"}], "row 1: not a readable image"),
    ([{"image": "c.png", "prompt": "a car"}], "row 0: image not found"),
    ([{"image": "deep.png", "prompt": "a car"}], "has pixel mode 'I;16' (16/32-bit or float)"),
    ([{"image": "a.png", "prompt": "a car", "elements": "car"}], "row 0: element 'car' has no ' (<category>)' suffix"),
    ([{"image": "a.png", "prompt": "a <image> car"}], "row 0: prompt holds '<image>'"),
    ([{"image": "a.png", "prompt": "a car", "prompt_type": "fake"}], "row 0: prompt type must be one of"),
    ([{"image": "a.png", "prompt": "a car", "prompt_meaningless": 3}], "row 0: prompt_meaningless must be a number in [0, 1]"),
])
def test_a_bad_row_is_named_before_any_model_loads(rows, message, folder, tmp_path, imatch):
    code, _, err = _cli(imatch, folder, rows, tmp_path)
    assert code == 2 and message in err and "prompts.csv" in err, err
    assert "no-models" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [("", "not readable as CSV"), ("image,prompt\n", "no rows to score"),
                                             ("file,text\na.png,x\n", "missing column 'image'")])
def test_an_empty_or_headless_table_is_named(content, message, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as refused:
        read_prompts(path)
    assert str(path) in str(refused.value)


def test_blank_elements_repeated_images_and_every_format_are_read(folder, tmp_path):
    rows = [{"image": "a.png", "prompt": "a red square", "elements": "red square (object)", "seed": 1},
            {"image": "a.png", "prompt": "a blue square", "elements": None, "seed": 2},  # same image, other prompt
            {"image": "b.png", "prompt": "a blue square", "elements": "", "seed": 3}]
    for suffix in (".csv", ".json", ".jsonl"):
        path = tmp_path / f"p{suffix}"
        if suffix == ".csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        elif suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        table = read_prompts(path)
        assert list(table["seed"]) == [1, 2, 3], suffix
        samples, elements = check_inputs([folder / n for n in table["image"]], table["prompt"].tolist(),
                                         table["elements"].tolist(), label=str(path))
        assert list(samples["img_path"]) == ["row-0000000", "row-0000001", "row-0000002"]
        assert elements[["img_path", "element"]].values.tolist() == [["row-0000000", "red square (object)"]]


def test_a_16_bit_image_given_as_pil_is_refused_like_ingest_refuses_it():
    with pytest.raises(InputError, match=r"row 1: image <image 1> has pixel mode 'I;16'"):
        check_inputs([Image.new("RGB", (8, 8)), Image.new("I;16", (8, 8), 40000)], ["a", "b"])


def test_a_bundle_without_settings_is_refused(tmp_path):
    from imatch import bundle
    from imatch.integrity import seal

    folder = tmp_path / "ens"
    folder.mkdir()
    described = {"format": 1, "tau": 3.0, "overall": {"members": ["m"], "weights": [1.0]},
                 "element": {"members": [], "weights": []}, "element_levels_from": None,
                 "models": {"m": {"task": "overall", "arch": "internvl", "folder": "models/m", "base": None,
                                  "settings": {"metadata": []}, "alphabet": list("abcdefghijklmno"),
                                  "image_budget": {"max_pixels": None, "max_tiles": None}}}}
    (folder / "bundle.json").write_text(json.dumps(described))
    seal(folder)
    with pytest.raises(InputError, match=r"model 'm': settings lack \['prompt_type', 'element_levels'\]"):
        bundle.load(folder)


def _browser() -> str:
    """Chromium from Debian's packages (installed here when missing and allowed, as the SLURM
    test installs SLURM); skipped without one unless IMATCH_REQUIRE_BROWSER=1 (.ci/run)."""
    import os
    import shutil
    import subprocess

    found = shutil.which("chromium")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
            subprocess.run(step, capture_output=True, env=env)
        found = shutil.which("chromium")
    if not found:
        if os.environ.get("IMATCH_REQUIRE_BROWSER") == "1":
            pytest.fail("a browser is required here (IMATCH_REQUIRE_BROWSER=1) but chromium is not installable")
        pytest.skip("no chromium")
    return found


def test_the_summary_page_renders_in_a_real_browser_and_sorts(tmp_path):
    """summary.html linked absolute file:// URIs (broken once moved or served) and showed no file
    names. Now it is one self-contained page: moved to another folder without its images, headless
    Chromium still shows every thumbnail (their colours are on the screenshot), the file names,
    and sorts by total score when its header is clicked."""
    import shutil
    import subprocess

    import numpy as np

    from imatch.predict import summary_html

    images = tmp_path / "imgs"
    images.mkdir()
    colours = {"red.png": (230, 20, 20), "blue.png": (20, 20, 230), "green.png": (20, 200, 20)}
    for name, rgb in colours.items():
        Image.new("RGB", (120, 90), rgb).save(images / name)
    scores = pd.DataFrame({"image": list(colours), "prompt": ["a red card", "a blue card", "a green card"],
                           "total_score": [2.5, 4.75, 1.25]})
    elements = pd.DataFrame({"row": [0, 1], "image": ["red.png", "blue.png"], "element": ["red (color)", "blue (color)"],
                             "expected_level": [5.2, 2.1], "hit": [True, False]})
    page = summary_html(scores, elements, images)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "summary.html").write_text(page)
    shutil.rmtree(images)  # the page needs nothing beside it
    chromium = _browser()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,700"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", (moved / "summary.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels.std(axis=0) > 10).all()  # not blank
    for name, rgb in colours.items():
        near = (np.abs(pixels - np.array(rgb)).max(axis=1) < 40).sum()
        assert near > 2000, f"{name}'s thumbnail is not on the page ({near} pixels)"
    # click the "total score" header, then read the rows back from the live DOM
    (moved / "clicked.html").write_text(page.replace("</body>", "<script>document.querySelectorAll('th[data-sort]')[3]"
                                                                ".click()</script></body>"))
    dom = subprocess.run([*flags, "--dump-dom", (moved / "clicked.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    order = [name for name in sorted(colours, key=dom.find)]
    assert "<td>red.png</td>" in dom and order == ["green.png", "red.png", "blue.png"], order  # 1.25, 2.5, 4.75
