"""The batch runner's job tables, ids, output names and terminal display, without a server: property-based tests
(hypothesis, bounded: a few hundred examples each, no deadline flakiness) of the table parser, which any text must
leave with rows or a BatchError naming the line, never another exception, a NaN, a list (a link in ComfyUI's eyes) or
an unsafe folder name. The coverage-guided fuzzer for the same parser is tests/fuzz/fuzz_job_table.py (run by hand)."""
import csv
import io
import json
import math
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batch  # scripts/ is on sys.path (conftest.py)
import comfy_server

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "reference"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 1]}, "_meta": {"title": "prompt"}},
    "9": {"class_type": "KSampler", "inputs": {"seed": 1, "cfg": 7.0, "model": ["2", 0]}, "_meta": {"title": "seed"}},
    "10": {"class_type": "IDFusionApply", "inputs": {"weight": 1.0, "enabled": True}, "_meta": {"title": "IDFusion Apply"}},
    "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": "idfusion_demo/with_identity"},
           "_meta": {"title": "Save Image (with identity)"}},
}
INFO = {
    "LoadImage": {"input": {"required": {"image": [["a.png", "unseen_0.png", "unseen_1.png"], {"image_upload": True}]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}}},
    "KSampler": {"input": {"required": {"seed": ["INT", {}], "cfg": ["FLOAT", {}], "model": ["MODEL"]}}},
    "IDFusionApply": {"input": {"required": {"weight": ["FLOAT", {}], "enabled": ["BOOLEAN", {}]}}},
    "SaveImage": {"input": {"required": {"filename_prefix": ["STRING", {}]}}},
}
ADDRESSES = ["reference.image", "prompt.text", "seed.seed", "seed.cfg", "IDFusion Apply.weight", "IDFusion Apply.enabled",
             "id", "nosuch.text", "seed.nosuch", "KSampler.seed", "9.cfg", "prompt"]
BOUNDED = settings(max_examples=300, deadline=None, database=None,  # no .hypothesis/ folder left in the tree
                   suppress_health_check=[HealthCheck.too_slow])


def parse_jobs(text: str, jsonl: bool):
    """The table's jobs, or None when it is refused with a BatchError (the only error a table may raise)."""
    try:
        return batch.rows_jobs(WORKFLOW, INFO, batch.parse_table(text, "t.jsonl" if jsonl else "t.csv", jsonl), "/nonexistent")
    except batch.BatchError as e:
        assert str(e), e
        return None


def check_jobs(jobs):
    """What the runner relies on from any table it accepted."""
    assert len({j.id for j in jobs}) == len(jobs)
    for job in jobs:
        folder = batch.job_dir_name(job.id)
        assert folder and os.sep not in folder and "/" not in folder and not folder.startswith("."), folder
        for nid, name, value in job.inputs:
            assert nid in WORKFLOW and isinstance(name, str)
            assert isinstance(value, (str, int, float, bool)), value  # never a list: ComfyUI reads one as a link
            assert not (isinstance(value, float) and not math.isfinite(value)), value
        json.dumps(job.values, allow_nan=False)  # the manifest line holds them


scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=30), st.sampled_from(["", "a.png", "unseen_0.png", "../x.png", "/etc/passwd",
                                                          "3", "1e400", "nan", "true", "  7 "]))
value = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=5), scalar, max_size=2))
row = st.dictionaries(st.sampled_from(ADDRESSES) | st.text(max_size=12), value, max_size=5)


@BOUNDED
@given(st.text(max_size=400), st.booleans())
def test_any_text_is_rows_or_a_batch_error(text, jsonl):
    jobs = parse_jobs(text, jsonl)
    if jobs is not None:
        check_jobs(jobs)


@BOUNDED
@given(st.lists(row, min_size=1, max_size=6))
def test_jsonl_objects_are_jobs_with_finite_scalar_values_or_refused(rows):
    text = "\n".join(json.dumps(r, allow_nan=True) for r in rows) + "\n"
    jobs = parse_jobs(text, True)
    if jobs is not None:
        check_jobs(jobs)


@BOUNDED
@given(st.lists(st.lists(st.text(st.characters(blacklist_characters="\x00"), max_size=12), min_size=3, max_size=3),
                min_size=1, max_size=6))
def test_csv_cells_come_back_as_written(cells):
    """Whatever the cells hold (quotes, commas, newlines), a prompt column gets them back unchanged. (NUL: Python
    3.10's csv module cannot write it, and its reader refuses it: a BatchError, see the test above.)"""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt.text", "IDFusion Apply.enabled", "id"])
    for i, (text, _, _) in enumerate(cells):
        w.writerow([text, "true", f"job{i}"])
    jobs = parse_jobs(buf.getvalue(), False)
    assert jobs is not None
    assert [j.id for j in jobs] == [f"job{i}" for i in range(len(cells))]
    assert [j.values.get("prompt.text", "") for j in jobs] == [c[0] for c in cells]
    check_jobs(jobs)


@BOUNDED
@given(st.lists(st.text(max_size=60), min_size=1, max_size=8, unique=True))
def test_derived_ids_are_unique_stable_and_safe(prompts):
    rows = [{"prompt.text": p, "seed.seed": 1} for p in prompts]
    ids = batch.derive_ids(rows)
    assert ids == batch.derive_ids(rows)
    assert len({i for i, _ in ids}) == len(rows)
    for job_id, digest in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]*[0-9a-f]{8}", job_id) and job_id.endswith(digest), job_id


@BOUNDED
@given(st.dictionaries(st.text(max_size=20), st.tuples(st.one_of(st.none(), st.text(max_size=20), st.integers()),
                                                       st.one_of(st.none(), st.text(max_size=20))), max_size=6))
def test_output_names_are_safe_and_distinct_whatever_the_ids_and_titles(nodes):
    """Node ids come from the server's /history, prefixes and titles from the workflow: every name is one safe file
    name part, and no two nodes share one."""
    wf = {nid: {"class_type": "SaveImage", "inputs": {"filename_prefix": p}, "_meta": {"title": t}}
          for nid, (p, t) in nodes.items()}
    names = batch.output_names(wf, batch.Job("j", 0, {}, []), list(nodes))
    assert set(names) == set(nodes) and len(set(names.values())) == len(nodes)
    for n in names.values():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", n), n


# ---------------------------------------------------------------------------------------------- examples (issue 21)

PROMPTS = ["a photo of a person, smiling, facing left, teal background",
           "a photo of a person, crying, facing front, orange background"]


def test_job_ids_carry_the_words_that_tell_prompts_apart():
    """Before issue 21 both read 'a_photo_of_a_person' (the first 20 characters)."""
    jobs = batch.cross_jobs(WORKFLOW, INFO, ["unseen_0.png", "unseen_1.png"], PROMPTS, [2], "reference.image",
                            "prompt.text", "seed.seed")
    readable = [j.id.rsplit("-", 1)[0] for j in jobs]
    assert readable == ["unseen_0-smiling_left_teal-2", "unseen_0-crying_front_orange-2",
                        "unseen_1-smiling_left_teal-2", "unseen_1-crying_front_orange-2"], readable
    # the same words in another order: the common leading and trailing words go instead
    labels = batch.distinguishing_labels(["a cat on a mat", "a mat on a cat"])
    assert labels == {"a cat on a mat": "cat_on_a_mat", "a mat on a cat": "mat_on_a_cat"}, labels


def test_a_rerun_finds_its_jobs_when_the_readable_part_of_ids_changed(tmp_path):
    """One prompt more changes what tells the prompts apart; the digest of a job's values does not, so the manifest
    still finds the jobs it has (also those recorded under the old 20-character ids)."""
    first = batch.cross_jobs(WORKFLOW, INFO, None, PROMPTS[:1], [2], "", "prompt.text", "seed.seed")
    path = tmp_path / "manifest.jsonl"
    m = batch.Manifest(str(path))
    m.open()
    m.append({"job": "a_photo_of_a_person-2-" + first[0].digest, "status": "done"})
    m.close()
    again = batch.cross_jobs(WORKFLOW, INFO, None, PROMPTS, [2], "", "prompt.text", "seed.seed")
    m = batch.Manifest(str(path))
    assert again[0].id != first[0].id and m.find(again[0])["status"] == "done" and m.find(again[1]) is None


def test_output_files_are_named_by_the_save_node():
    job = batch.make_job(WORKFLOW, INFO, {"prompt.text": "x"}, 0, "t")
    wf = {**WORKFLOW, "12": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"},
                             "_meta": {"title": "Save Image (without identity)"}},
          "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["6", 0]}, "_meta": {"title": "Save Image"}},
          "14": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["6", 0]}, "_meta": {"title": "Save Image"}}}
    names = batch.output_names(wf, job, ["11", "12", "13", "14", "../../X"])
    assert names == {"11": "with_identity", "12": "Save_Image_without_identity", "13": "Save_Image_13",
                     "14": "Save_Image_14", "../../X": "node_X"}, names
    job = batch.make_job(WORKFLOW, INFO, {"Save Image (with identity).filename_prefix": "run2/ann"}, 0, "t")
    assert batch.output_names(WORKFLOW, job, ["11"]) == {"11": "ann"}  # as the job set it


def test_table_values_that_are_not_finite_scalars_are_refused_naming_line_and_column(tmp_path):
    cases = [('{"IDFusion Apply.weight": NaN}', "line 1 is not JSON (NaN is not a number"),
             ('{"seed.cfg": 1e999}', "line 1, seed.cfg: inf is not a finite number"),
             ('{"seed.cfg": ["4", 0]}', "line 1, seed.cfg: [\"4\", 0] is a list"),
             ('{"id": {"a": 1}}', "line 1, id: {\"a\": 1} is a dict"),
             ("[" * 100000, "line 1 is not JSON"),
             ('{"reference.image": "faces/ann.png"}', "line 1, reference.image: no file"),
             ('{"reference.image": "ann.png"}', "and the server's input folder has no 'ann.png'")]
    for text, message in cases:
        with pytest.raises(batch.BatchError) as e:
            batch.rows_jobs(WORKFLOW, INFO, batch.parse_table(text + "\n", "t.jsonl", True), str(tmp_path))
        assert message in str(e.value), (message, str(e.value))
    with pytest.raises(batch.BatchError, match="t.csv line 2, IDFusion Apply.weight: nan is not a finite number"):
        batch.rows_jobs(WORKFLOW, INFO, batch.parse_table("IDFusion Apply.weight\nnan\n", "t.csv", False), "")
    (tmp_path / "t.csv").write_bytes(b"prompt.text\n\xff\xfe\n")
    with pytest.raises(batch.BatchError, match="is not UTF-8 text"):
        batch.read_table(str(tmp_path / "t.csv"))


# ---------------------------------------------------------------------------------------------- the display

class Terminal(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: cursor-up/erase codes applied to a list of lines (enough for Progress)."""
    lines, row = [""], 0
    for token in re.split(r"(\x1b\[\d*[A-Za-z]|\r|\n)", text):
        if token == "\n":
            row += 1
            lines[row:row + 1] = [lines[row] if row < len(lines) else ""]
        elif token == "\r":
            pass
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row -= int(token[2:-1] or 1)
            elif token.endswith("J"):
                del lines[row + 1:]
                lines[row] = ""
        elif token:
            lines[row] = token if lines[row] == "" else lines[row] + token
    return [l for l in lines if l]


def test_progress_fits_the_terminal_and_shows_every_server(monkeypatch):
    """Three servers on a 70-column terminal: the batch on one line, each server on its own, none wider than the
    terminal; the down one says DOWN, the busy one names the sampler's step as a step ('step 3/20'), not under the
    node's title. Before issue 21 one line was cut at the width: only the first server showed."""
    monkeypatch.setenv("COLUMNS", "70")
    clients = [comfy_server.ComfyClient(f"http://127.0.0.1:{9}{i}") for i in range(3)]
    wf = json.loads(json.dumps(WORKFLOW))
    jobs = batch.cross_jobs(wf, INFO, ["unseen_0.png"], PROMPTS, [2, 3], "reference.image", "prompt.text", "seed.seed")
    term = Terminal()
    progress = batch.Progress(len(jobs), stream=term)
    runner = batch.Runner(wf, jobs, clients, collector=None, progress=progress)
    busy, down, idle = runner.workers
    slot = batch.Slot(jobs[0], "p1")
    busy.slots["p1"] = slot
    busy.on_event("executing", {"prompt_id": "p1", "node": "9"})
    busy.on_event("progress", {"prompt_id": "p1", "node": "9", "value": 3, "max": 20})
    down.alive = False
    for _ in range(3):  # redrawn in place: the same lines, not three copies
        progress.render(runner.workers)
    progress.note("done something")
    progress.render(runner.workers)
    shown = screen(term.getvalue())
    assert shown[0] == "done something" and len(shown) == 5, shown
    assert all(len(l) < 70 for l in shown), [len(l) for l in shown]
    assert "s1" in shown[2] and "KSampler 'seed' step 3/20" in shown[2], shown
    assert "s2 DOWN" in shown[3] and "s3 idle" in shown[4], shown
    # a wide terminal: all on one line
    monkeypatch.setenv("COLUMNS", "400")
    term.truncate(0)
    term.seek(0)
    progress._shown = 0
    progress.render(runner.workers)
    assert len(screen(term.getvalue())) == 1 and "s3 idle" in term.getvalue()
