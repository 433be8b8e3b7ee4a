"""``tieradv tabular``: JSON with both dynamics' curves and a plot."""

from __future__ import annotations

import json

from tieradv.cli import main


def test_tabular_command_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "tabular.json"
    assert main(["tabular", "--steps", "200", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"separated", "single"}
    separated, single = result["runs"]["separated"], result["runs"]["single"]
    assert separated["exploitability"][0] == single["exploitability"][0] > 0
    assert separated["final_exploitability"] < single["final_exploitability"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["separated"]["fitted_rate"] < 0
