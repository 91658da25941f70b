"""seqpipe-compare on run logs in examples/pretrain_gpt.py's format: the summary table's figures, the
PNG, and one clear error for a log it cannot read."""
import json

import matplotlib.image
import pytest

from seqpipe_ds.cli import compare as cli
from seqpipe_ds.compare import read_run

MIB = 2 ** 20
TOKENS = 512  # per iteration


def write_log(path, losses, seconds, peak_mib, valid=None):
    records = [{"iteration": i, "loss": loss, "lr": 1e-3, "seconds": s, "tokens_per_s": TOKENS / s,
                "tflops_per_gpu": 0.01, "peak_memory_bytes": peak_mib * MIB}
               for i, (loss, s) in enumerate(zip(losses, seconds), start=1)]
    if valid is not None:
        records.append({"iteration": len(losses), "valid_loss": valid})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def logs(tmp_path):
    # a slow first (warm-up) iteration in both; seqpipe 1.6x faster after it, less memory, same losses
    # but the third
    stock = write_log(tmp_path / "stock.jsonl", [6.0, 5.5, 5.0, 4.5], [9.0, 1.0, 1.0, 1.0], 300, valid=4.6)
    seqpipe = write_log(tmp_path / "seqpipe.jsonl", [6.0, 5.5, 5.25, 4.5], [9.0, 0.5, 0.75, 0.625], 200)
    return stock, seqpipe


@pytest.mark.timeout(60)
def test_table_and_png(logs, tmp_path, capsys):
    png = tmp_path / "compare.png"
    cli.main([*logs, "--png", str(png)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "iters", "final", "loss", "tokens/s", "x", "first", "peak", "MiB", "max",
                              "|dloss|"]
    # tokens over seconds after the first iteration: 3 × 512 / 3 s and 3 × 512 / 1.875 s
    assert out[2].split() == ["stock", "4", "4.5000", "512", "1.00x", "300", "(reference)"]
    assert out[3].split() == ["seqpipe", "4", "4.5000", "819", "1.60x", "200", "0.25"]
    assert out[-1] == f"wrote {png}"
    image = matplotlib.image.imread(str(png))
    assert image.shape[:2] == (504, 1800)  # three panels side by side: 15 × 4.2 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # something is drawn


@pytest.mark.timeout(60)
def test_labels_and_a_resumed_log_keeps_the_last_record_of_each_iteration(logs, tmp_path, capsys):
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(open(logs[0]).read() + "".join(
        json.dumps({"iteration": i, "loss": 4.0, "seconds": 1.0, "tokens_per_s": TOKENS}) + "\n" for i in (3, 4)))
    run = read_run(str(resumed))
    assert run.loss == {1: 6.0, 2: 5.5, 3: 4.0, 4: 4.0} and run.valid_loss == {4: 4.6}
    cli.main([logs[0], str(resumed), "--labels", "before", "after"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:4]]
    assert [row[0] for row in rows] == ["before", "after"] and rows[1][-1] == "1"


BAD = {
    "not JSON": ('{"iteration": 1, "loss": 1.0, "seconds": 1, "tokens_per_s": 1}\n{"iteration": 2,\n',
                 "bad.jsonl:2: not a run-log record (a JSON object with an iteration)"),
    "no iteration": ('{"loss": 1.0}\n', "bad.jsonl:1: not a run-log record"),
    "validation only": ('{"iteration": 4, "valid_loss": 1.0}\n',
                        "bad.jsonl: no training records (with loss, seconds, tokens_per_s)"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD)
def test_an_unreadable_log_is_one_error_naming_it(case, logs, tmp_path, capsys):
    content, message = BAD[case]
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([logs[0], str(tmp_path / "bad.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("seqpipe-compare: error: ") and message in err and err.count("\n") == 1


@pytest.mark.timeout(60)
def test_labels_must_match_the_runs(logs, capsys):
    with pytest.raises(SystemExit):
        cli.main([*logs, "--labels", "one"])
    assert "--labels names 1 runs, but 2 were given" in capsys.readouterr().err
