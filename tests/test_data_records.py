"""The record format: reading, writing, validation with file:line errors, image loading, class tables."""

import json
import os
import shutil

import pytest
from PIL import Image

from data.records import (ImageError, RecordError, class_names, classes_of, load_classes, load_image, read_records,
                          write_classes, write_records)


def png(path, colour=(200, 30, 30), size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def lines(path, rows):
    """Write raw lines (strings as they are, dicts as JSON)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def test_write_then_read_keeps_fields_and_makes_paths_portable(tmp_path):
    image = png(tmp_path / "out" / "images" / "a.png")
    outside = png(tmp_path / "elsewhere" / "b.png")
    records = [{"image": image, "label": "red circle", "label_id": 3, "dataset": "toy", "split": "train",
                "aliases": ["circle, red"], "parents": ["circle"], "negative": outside, "my_field": {"x": [1, 2]},
                "_private": "dropped"}]
    path = tmp_path / "out" / "train.jsonl"
    write_records(path, records)
    written = json.loads(path.read_text())
    assert written["image"] == "images/a.png"  # under the output folder: relative
    assert written["negative"] == outside  # elsewhere: absolute
    assert "_private" not in written and written["my_field"] == {"x": [1, 2]}

    back = read_records(path)
    assert back[0]["image"] == image and back[0]["negative"] == outside
    assert back[0]["my_field"] == {"x": [1, 2]} and back[0]["aliases"] == ["circle, red"]
    assert back[0]["_src"] == f"{path}:1"


def test_a_prepared_folder_can_be_moved(tmp_path):
    png(tmp_path / "a" / "images" / "x.png", colour=(1, 2, 3))
    write_records(tmp_path / "a" / "train.jsonl", [{"image": str(tmp_path / "a" / "images" / "x.png"), "label": "x"}])
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    record = read_records(tmp_path / "b" / "train.jsonl", check_images=True)[0]
    assert record["image"] == str(tmp_path / "b" / "images" / "x.png")
    assert load_image(record["image"]).getpixel((0, 0)) == (1, 2, 3)


def test_blank_lines_are_ignored_and_line_numbers_count_them(tmp_path):
    image = png(tmp_path / "a.png")
    path = lines(tmp_path / "r.jsonl", [{"image": image, "label": "a"}, "", "   ", {"image": image, "label": "b"}])
    records = read_records(path)
    assert [r["label"] for r in records] == ["a", "b"]
    assert records[1]["_src"].endswith(":4")


@pytest.mark.parametrize("row, reason", [
    ('{"image": "a.png", "label": ', "invalid JSON"),
    ('["a.png", "x"]', "expected a JSON object"),
    ({"label": "x"}, "missing field 'image'"),
    ({"image": "a.png"}, "missing field 'label'"),
    ({"image": "a.png", "label": ""}, "field 'label' is empty"),
    ({"image": "a.png", "label": 7}, "field 'label' must be a string"),
    ({"image": "a.png", "label": "x", "label_id": "3"}, "field 'label_id' must be a non-negative integer"),
    ({"image": "a.png", "label": "x", "aliases": "y"}, "field 'aliases' must be a list of strings"),
    ({"image": "a.png", "label": "x", "options": ["p", "q"], "answer": "C"}, "answer 'C' is not one of"),
    ({"image": "a.png", "label": "x", "options": ["p", "q"], "answer": ""}, "answer '' is not one of"),
    ({"image": "a.png", "label": "x", "options": ["p", "q", "r"], "answer": "AB"}, "answer 'AB' is not one of"),
    ({"image": "a.png", "label": "x", "options": ["p", "q", "r"], "answer": "BC"}, "answer 'BC' is not one of"),
    ({"image": "a.png", "label": "x", "options": ["p"]}, "needs at least 2 options"),
    ({"image": "a.png", "label": "x", "options": ["y", "x"], "answer": "A"},
     "answer 'A' is option 'y', not the label 'x'"),
    ({"image": "a.png", "label": "y", "aliases": ["X"]}, "alias 'X' of 'y' also names class 'x'"),
    ({"image": "a.png", "label": "parrot"}, "unknown label 'parrot'"),
])
def test_bad_lines_name_file_line_and_reason(tmp_path, row, reason):
    png(tmp_path / "a.png")
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "x"}, row])
    with pytest.raises(RecordError) as e:
        read_records(path, known_labels={"x", "y"})
    assert str(e.value).startswith(f"{path}:2: ")
    assert reason in str(e.value)
    assert e.value.line == 2


def test_an_alias_two_classes_share_is_refused_with_or_without_a_class_table(tmp_path, capsys):
    """Records of two classes that both carry an alias: reward.is_correct would credit an answer naming it
    to either class. Refused at the second one's line, whether or not classes.json lists the alias."""
    png(tmp_path / "a.png")
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "x", "aliases": ["sea bird"]},
                                        {"image": "a.png", "label": "x", "aliases": ["sea bird"]},
                                        {"image": "a.png", "label": "y", "aliases": ["Sea-Bird"]}])
    table = {"classes": [{"id": 0, "name": "x"}, {"id": 1, "name": "y"}]}
    for classes in (None, table):
        with pytest.raises(RecordError, match=r"r.jsonl:3: alias 'Sea-Bird' of 'y' also names class 'x'"):
            read_records(path, classes=classes)
    assert [r["label"] for r in read_records(path, skip_bad=True)] == ["x", "x"]
    assert "skipped 1 bad record(s)" in capsys.readouterr().err


def test_a_file_that_is_not_utf8_names_its_line(tmp_path, capsys):
    """A JSONL file saved as cp1252 (a Windows editor's default): file, line and byte, not a bare
    UnicodeDecodeError; with skip_bad the line is dropped and counted; `prepare check` lists it."""
    from data import prepare
    png(tmp_path / "a.png")
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"image": "a.png", "label": "x"}\n{"image": "a.png", "label": "Caf\xe9"}\n'
                     b'{"image": "a.png", "label": "y"}\n')
    with pytest.raises(RecordError, match=r"r.jsonl:2: not UTF-8 text \(byte 0xe9 at column 33\)"):
        read_records(path)
    assert [r["label"] for r in read_records(path, skip_bad=True)] == ["x", "y"]
    assert "skipped 1 bad record(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["check", str(path)])
    assert f"bad record: {path}:2: not UTF-8" in capsys.readouterr().err
    (tmp_path / "classes.json").write_bytes(b'{"classes": [\n {"id": 0, "name": "Caf\xe9"}\n]}\n')
    with pytest.raises(RecordError, match=r"classes.json:2: not UTF-8 text \(byte 0xe9"):
        load_classes(tmp_path / "classes.json")


def test_check_images_names_the_line_and_the_image(tmp_path):
    good = png(tmp_path / "good.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    path = lines(tmp_path / "r.jsonl", [{"image": good, "label": "x"}, {"image": "missing.png", "label": "x"},
                                        {"image": "corrupt.jpg", "label": "x"}])
    assert len(read_records(path)) == 3  # without check_images images are not opened
    with pytest.raises(RecordError) as e:
        read_records(path, check_images=True)
    assert str(e.value).startswith(f"{path}:2: ") and "missing.png" in str(e.value) and "not found" in str(e.value)


def test_skip_bad_drops_and_counts(tmp_path, capsys):
    good = png(tmp_path / "good.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    path = lines(tmp_path / "r.jsonl", [{"image": good, "label": "x"}, "{broken", {"image": "corrupt.jpg", "label": "x"},
                                        {"image": good, "label": "y"}])
    records = read_records(path, check_images=True, skip_bad=True)
    assert [r["label"] for r in records] == ["x", "y"]
    err = capsys.readouterr().err
    assert "skipped 2 bad record(s)" in err and f"{path}:2: invalid JSON" in err


def test_missing_records_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_records(tmp_path / "nowhere.jsonl")


def test_load_image_converts_and_rejects_bad_files(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 4)

    with pytest.raises(ImageError, match="missing.png.*not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="text.png.*cannot decode"):
        load_image(tmp_path / "text.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")


def test_a_failed_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "train.jsonl"
    write_records(path, [{"image": "/a.png", "label": "x"}])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_records(path, [{"image": "/b.png", "label": "y"}, {"image": "/c.png", "label": object()}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["train.jsonl"]  # no temp file left behind


def test_class_table_roundtrip_and_names(tmp_path):
    table = {"dataset": "cub", "domain": "bird", "classes": [
        {"id": 0, "name": "Laysan Albatross", "aliases": [], "parents": [], "base": True},
        {"id": 1, "name": "Brewer Blackbird", "aliases": ["Brewer's Blackbird"], "parents": ["Icteridae"], "base": True},
        {"id": 2, "name": "Artic Tern", "aliases": ["Arctic Tern"], "parents": [], "base": False}]}
    write_classes(tmp_path / "classes.json", table)
    loaded = load_classes(tmp_path)  # a prepared folder works as well as the file
    assert loaded == table
    assert class_names(loaded, "base") == ["Laysan Albatross", "Brewer Blackbird"]
    assert class_names(loaded, "novel") == ["Artic Tern"]
    assert class_names(loaded) == ["Laysan Albatross", "Brewer Blackbird", "Artic Tern"]
    with pytest.raises(ValueError):
        class_names(loaded, "seen")

    mixed = {"dataset": "mix", "domain": "object", "classes": [], "parts": {"cub": loaded, "toy": {
        "dataset": "toy", "classes": [{"id": 0, "name": "solid red circle", "base": False}]}}}
    assert class_names(mixed, "novel") == ["Artic Tern", "solid red circle"]
    assert class_names(mixed, "all", dataset="toy") == ["solid red circle"]
    assert classes_of(mixed, "cub") == loaded["classes"] and classes_of(loaded, "anything") == loaded["classes"]


def test_class_table_with_wrong_ids_is_rejected(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"dataset": "x", "classes": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="class #0 .* has id 1"):
        load_classes(tmp_path / "classes.json")


@pytest.mark.parametrize("names", [["Tern", "Gull", "Tern"], ["Arctic Tern", "Gull", "arctic-tern"]])
def test_class_table_with_two_classes_of_one_name_is_rejected(tmp_path, names):
    """Two classes an answer cannot tell apart (the same name, or the same once normalised): every answer
    naming one would be credited to both, so the table is refused naming the two."""
    table = {"dataset": "x", "classes": [{"id": i, "name": n} for i, n in enumerate(names)]}
    (tmp_path / "classes.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=f"classes #0 {names[0]!r} and #2 {names[2]!r}"):
        load_classes(tmp_path / "classes.json")
    mixed = {"dataset": "mix", "classes": [], "parts": {"a": table}}
    (tmp_path / "classes.json").write_text(json.dumps(mixed))
    with pytest.raises(ValueError, match="classes #0"):
        load_classes(tmp_path / "classes.json")


def test_data_does_not_import_the_model_stack():
    import subprocess
    import sys
    code = ("import sys, data, data.prepare, data.toy, data.loaders, data.splits; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_transparency_is_composited_onto_white_as_transformers_does(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent pixels that store red
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    rgba.save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # not the stored red, not black
    assert image.getpixel((1, 0)) == (0, 0, 255)
    assert abs(image.getpixel((2, 0))[0] - 127) <= 1  # half-way between black and white
    la = Image.new("LA", (2, 2), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # what PIL gives for a 16-bit PNG
    image = load_image(tmp_path / "deep.png")
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]  # convert("RGB") gives 0, 255, 255, 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # a red block at the top left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.size == (30, 60)
    assert shown.getpixel((25, 5))[0] > 200 and shown.getpixel((5, 5))[0] < 50  # now at the top right


def test_too_elongated_images_are_named_and_skippable(tmp_path, capsys):
    png(tmp_path / "ok.png", size=(400, 2))  # exactly 200:1: Qwen2.5-VL's processor takes it
    assert load_image(tmp_path / "ok.png").size == (400, 2)
    png(tmp_path / "strip.png", size=(402, 2))
    with pytest.raises(ImageError, match=r"strip.png: 402x2 pixels, an aspect ratio over 200:1"):
        load_image(tmp_path / "strip.png")
    path = lines(tmp_path / "r.jsonl", [{"image": "ok.png", "label": "x"}, {"image": "strip.png", "label": "x"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: .*strip.png.*200:1"):
        read_records(path, check_images=True)
    assert len(read_records(path, check_images=True, skip_bad=True)) == 1
    assert "skipped 1 bad record" in capsys.readouterr().err


def test_names_and_aliases_are_one_table_across_the_files_of_a_run(tmp_path, capsys):
    """Two classes' records in two --data files that share an alias: the check per file saw neither clash.
    One NameTable carried from one read_records call to the next refuses the second record whatever the
    order of the files, naming both lines; with skip_bad it is dropped like any bad record."""
    from data.records import NameTable
    png(tmp_path / "a.png")
    a = lines(tmp_path / "a.jsonl", [{"image": "a.png", "label": "x", "aliases": ["sea bird"]}])
    b = lines(tmp_path / "b.jsonl", [{"image": "a.png", "label": "y"}, {"image": "a.png", "label": "y",
                                                                      "aliases": ["Sea-Bird"]}])
    assert len(read_records(a)) + len(read_records(b)) == 3  # each file alone is fine
    table = {"classes": [{"id": 0, "name": "x"}, {"id": 1, "name": "y"}]}
    for classes in (None, table):
        names = NameTable()
        read_records(a, classes=classes, names=names)
        with pytest.raises(RecordError, match=r"b.jsonl:2: alias 'Sea-Bird' of 'y' also names class 'x' "
                                              r"\(alias 'sea bird' at .*a.jsonl:1\)"):
            read_records(b, classes=classes, names=names)
        names = NameTable()
        read_records(b, classes=classes, names=names)
        with pytest.raises(RecordError, match=r"a.jsonl:1: alias 'sea bird' of 'x' also names class 'y' "
                                              r"\(alias 'Sea-Bird' at .*b.jsonl:2\)"):
            read_records(a, classes=classes, names=names)
    names = NameTable()
    assert len(read_records(a, names=names)) == 1
    assert [r.get("aliases") for r in read_records(b, skip_bad=True, names=names)] == [None]
    assert "b.jsonl: skipped 1 bad record(s); first: " in capsys.readouterr().err


def test_a_label_that_an_earlier_record_gave_as_an_alias_is_refused(tmp_path):
    """Without --classes, a record whose label is an earlier record's alias of another class passed: only
    aliases were checked against the names seen so far. Labels that are one once normalised ('Tern' and
    'tern') are two classes no answer can tell apart."""
    png(tmp_path / "a.png")
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "x", "aliases": ["Y"]},
                                        {"image": "a.png", "label": "y"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: label 'y' also names class 'x' "
                                          r"\(alias 'Y' at .*r.jsonl:1\)"):
        read_records(path)
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "Tern"},
                                        {"image": "a.png", "label": "tern"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: label 'tern' also names class 'Tern'"):
        read_records(path)


@pytest.mark.parametrize("invisible", ["\u200b", "\u00ad", "\u2060", "\ufeff"])
def test_names_that_differ_by_an_invisible_character_are_one_name(tmp_path, invisible):
    """A zero-width space (a soft hyphen, a word joiner, a byte-order mark: Unicode format characters)
    shows nowhere, so 'Tern' and 'Te\\u200brn' are one name to a reader and to a model: refused as two
    classes' names in records, in classes.json, and as an alias of another class."""
    png(tmp_path / "a.png")
    hidden = f"Te{invisible}rn"
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "Tern"},
                                        {"image": "a.png", "label": hidden}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: label .* also names class 'Tern' \(label 'Tern' at "):
        read_records(path)
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "Gull", "aliases": [hidden]},
                                        {"image": "a.png", "label": "Tern"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: label 'Tern' also names class 'Gull'"):
        read_records(path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "Tern"},
                                                                   {"id": 1, "name": hidden}]}))
    with pytest.raises(ValueError, match="classes #0 'Tern' and #1 .* both name 'tern' once normalised"):
        load_classes(tmp_path / "classes.json")


def test_a_name_of_punctuation_alone_is_refused(tmp_path):
    """'???' normalises to nothing (reward.normalize deletes punctuation): no answer can ever be credited
    to it, in records or in classes.json."""
    png(tmp_path / "a.png")
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "x"}, {"image": "a.png", "label": "???"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: label '\?\?\?' is nothing once normalised"):
        read_records(path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "x"},
                                                                   {"id": 1, "name": "?!"}]}))
    with pytest.raises(ValueError, match=r"classes.json: class #1 '\?!' is nothing once normalised"):
        load_classes(tmp_path / "classes.json")


def test_an_alias_two_classes_share_in_classes_json_is_refused_naming_both(tmp_path):
    """The class table is the run's table too: an alias of one class that is another's name or alias."""
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [
        {"id": 0, "name": "Common Tern", "aliases": ["sea swallow"]},
        {"id": 1, "name": "Arctic Tern", "aliases": ["Sea-Swallow"]}]}))
    with pytest.raises(ValueError, match="classes #0 'Common Tern' and #1 'Arctic Tern' both name "
                                         "'sea swallow'"):
        load_classes(tmp_path / "classes.json")


def test_a_record_clashing_with_the_class_table_names_the_entry(tmp_path):
    png(tmp_path / "a.png")
    table = {"classes": [{"id": 0, "name": "x", "aliases": ["sea bird"]}, {"id": 1, "name": "y"}]}
    path = lines(tmp_path / "r.jsonl", [{"image": "a.png", "label": "y", "aliases": ["Sea bird"]}])
    with pytest.raises(RecordError, match=r"r.jsonl:1: alias 'Sea bird' of 'y' also names class 'x' "
                                          r"\(alias 'sea bird' at classes.json #0\)"):
        read_records(path, classes=table)
