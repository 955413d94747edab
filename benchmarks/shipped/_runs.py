"""What the shipped checkpoints' evaluation scripts share (run as scripts: this folder is on their path)."""


def training_seconds(rows: list[dict]) -> float:
    """Training seconds over every session of a run's ``metrics.jsonl`` rows: ``seconds`` restarts at each
    resume or extension."""
    total, last = 0.0, 0.0
    for r in rows:
        if r["seconds"] < last:
            total += last
        last = r["seconds"]
    return total + last
