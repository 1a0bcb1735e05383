"""The batch runner behind scripts/batch.py (the command line), split by concern; standard library only.

    common     errors and small helpers every module uses
    workflow   the API-format workflow: TITLE.INPUT addresses, typed values, --set
    jobs       jobs, their ids, the cross product (references x prompts x seeds)
    tables     CSV / JSONL job tables
    manifest   the resumable results file
    progress   the terminal display
    downloads  output files into --out, whatever the server answers
    worker     one server: queue prompts on it, follow them, collect their results
    health     a server that stops answering is dropped, its jobs requeued, and probed until it is back
    handover   a server's jobs taken back: Ctrl-C, work stealing, the end of the batch
    runner     the shared queue over the servers, records, stop

scripts/batch.py re-exports every public name, so `import batch` (face_benchmark, tests, benchmarks) keeps working.
"""
