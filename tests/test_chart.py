"""The report's chart: one bar per method with its interval, written atomically beside report.md."""

from mta_ray.files.chart import CHART_NAME, write_chart


def _report(methods):
    return {"task": "lamp2", "methods": {
        m: {"metrics": {"accuracy": v, "f1": v / 2}, "ci95": {"accuracy": [max(0.0, v - 0.1), v + 0.1],
                                                             "f1": [0.0, v]}, "n": 48}
        for m, v in methods.items()}}


def test_chart_is_a_png_beside_the_report(tmp_path):
    path = write_chart(_report({"base": 0.0, "rag_k1": 0.2, "merged_only": 0.5, "mta": 0.7}), tmp_path)
    assert path == tmp_path / CHART_NAME
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    assert [p.name for p in tmp_path.iterdir()] == [CHART_NAME]          # no temporary file left


def test_chart_of_a_regression_task_and_of_nothing(tmp_path):
    report = {"task": "lamp3", "methods": {"mta": {"metrics": {"mae": 0.8, "rmse": 1.1},
                                                   "ci95": {"mae": [0.6, 1.0], "rmse": [0.9, 1.3]}, "n": 10}}}
    assert write_chart(report, tmp_path).is_file()
    assert write_chart({"task": "lamp2", "methods": {}}, tmp_path / "empty") is None
