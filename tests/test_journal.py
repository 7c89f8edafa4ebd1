"""The journal: entries kept on disk, delivered in order, each once, across failures."""

from alexnet_mlflow.journal import Journal, Unreachable, journal_root


def test_entries_are_delivered_in_order_and_resume_after_an_outage():
    journal = Journal.create("run-a", "http://127.0.0.1:1")
    for step in (1, 2, 3):
        journal.append("metrics", step=step, values={"val_loss": 1.0 / step})
    sent, down = [], {"now": True}

    def send(entry):
        if down["now"] and entry["step"] == 2:
            raise Unreachable("connection refused")
        sent.append(entry["step"])

    assert journal.deliver(send) == 2  # step 1 went out, then the server went away
    assert sent == [1] and journal.delivered == 1
    down["now"] = False
    journal.append("end", status="FINISHED")
    assert "run-a" in [j.run_id for j in Journal.all()]  # a new process finds it (alexnet-mlflow sync)
    assert Journal(journal.folder).deliver(lambda e: sent.append(e.get("step", "end"))) == 0
    assert sent == [1, 2, 3, "end"]  # nothing twice, nothing lost, original order
    assert all(isinstance(e["timestamp"], int) for e in journal.entries())
    journal.remove()
    assert not (journal_root() / "run-a").exists()


def test_a_real_error_is_not_retried():
    journal = Journal.create("run-b", None)
    journal.append("tags", values={"a": "b"})

    def send(entry):
        raise ValueError("bad request")

    try:
        journal.deliver(send, timeout=60)
    except ValueError:
        pass
    else:
        raise AssertionError("a non-transient error must surface")
    assert journal.pending() == 1
    journal.remove()
