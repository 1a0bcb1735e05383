"""Coverage-guided fuzzing (atheris) of the batch runner's job-table parser: CSV and JSONL text -> rows -> jobs.
Run by hand, outside CI (pytest does not collect it: not a test_*.py file):

    pip install atheris      # into the Python that runs it; the tests' hypothesis properties run in CI instead
    python tests/fuzz/fuzz_job_table.py -max_total_time=600 [-runs=N] CORPUS_DIR tests/fuzz/seeds_job_table

The contract it holds the parser to: any text gives jobs or a BatchError (the one error the runner prints as a clear
message), and every job it accepts has a safe output folder, unique id, and values that are finite scalars the
manifest can write as strict JSON. Anything else raises and atheris saves the input as crash-<hash>."""
import json
import math
import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

with atheris.instrument_imports():
    import batch_runner.jobs
    import batch_runner.tables
    import batch_runner.workflow
    from batch_runner.common import BatchError

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "reference"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}, "_meta": {"title": "prompt"}},
    "9": {"class_type": "KSampler", "inputs": {"seed": 1, "cfg": 7.0, "noise_seed": 2}, "_meta": {"title": "seed"}},
    "10": {"class_type": "IDFusionApply", "inputs": {"weight": 1.0, "enabled": True}, "_meta": {"title": "IDFusion Apply"}},
}
INFO = {
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {}]}}},
    "KSampler": {"input": {"required": {"seed": ["INT", {}], "cfg": ["FLOAT", {}]}}},
    "IDFusionApply": {"input": {"required": {"weight": ["FLOAT", {}], "enabled": ["BOOLEAN", {}]}}},
}
BASE = os.path.join(ROOT, "workflows", "assets")  # a real folder: paths in the table resolve against it


def TestOneInput(data: bytes):
    # first byte: the format (odd: JSONL); the rest: the file's bytes, decoded as read_table would (bytes that are not
    # UTF-8 are refused there before parsing; here replaced, so the parser sees every text)
    jsonl, text = bool(data[:1]) and data[0] % 2 == 1, data[1:].decode("utf-8", "replace")
    try:
        rows = batch_runner.tables.parse_table(text, "fuzz.jsonl" if jsonl else "fuzz.csv", jsonl)
        jobs = batch_runner.tables.rows_jobs(WORKFLOW, INFO, rows, BASE)
    except BatchError as e:
        assert str(e)
        return
    assert len({j.id for j in jobs}) == len(jobs)
    for job in jobs:
        folder = batch_runner.jobs.job_dir_name(job.id)
        assert folder and "/" not in folder and os.sep not in folder and not folder.startswith("."), folder
        for nid, name, value in job.inputs:
            assert isinstance(value, (str, int, float, bool)), value
            assert not (isinstance(value, float) and not math.isfinite(value)), value
        json.dumps(job.values, allow_nan=False)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
