"""The real junjo SDK (JunjoOtelExporter, x-junjo-api-key) → lakewriter → DuckDB."""
import json

import duckdb

import junjo_app
from conftest import ADMIN_KEY


def test_junjo_workflow_fills_junjo_columns_and_state_patches(server):
    junjo_app.run(server.grpc_endpoint, ADMIN_KEY, "junjo-app")
    server.flush()
    con = duckdb.connect()
    spans = con.execute(
        f"""SELECT name, junjo_span_type, junjo_id, junjo_parent_id, junjo_wf_state_start,
                   junjo_wf_state_end, junjo_wf_graph_structure, junjo_wf_store_id, attributes_json,
                   parent_span_id, scope_name
            FROM read_parquet('{server.lake}/*/endpoint=spans/**/*.parquet', hive_partitioning = true)
            WHERE service_name = 'junjo-app' ORDER BY start_time"""
    ).fetchall()
    assert [s[0] for s in spans] == ["CountWorkflow", "CountNode", "GreetNode"]
    wf, count, greet = spans
    assert wf[1] == "workflow" and count[1] == "node" and greet[1] == "node"
    assert wf[2] and count[3] == wf[2] and greet[3] == wf[2]
    assert json.loads(wf[4])["items"] == ["a", "b", "c"]
    assert json.loads(wf[5])["greeting"] == "hello 3"
    graph = json.loads(wf[6])
    assert graph["v"] == 2 and len(graph["nodes"]) == 2
    assert wf[7]
    attrs = json.loads(wf[8])
    assert "junjo.executable_runtime_id" not in attrs and "junjo.workflow.state.start" not in attrs
    assert attrs["junjo.telemetry.contract_version"] == 2
    assert wf[9] is None and count[9] is not None and wf[10] == "junjo"

    patches = con.execute(
        f"""SELECT patch_id, patch_json, store_id, action, junjo_id
            FROM read_parquet('{server.lake}/*/endpoint=state_patches/**/*.parquet', hive_partitioning = true)
            ORDER BY timestamp"""
    ).fetchall()
    assert len(patches) == 2
    assert json.loads(patches[0][1]) == [{"op": "replace", "path": "/count", "value": 3}]
    assert patches[0][2] == wf[7]
    assert patches[0][3] == "set_count" and patches[1][3] == "set_greeting"
    assert patches[0][4] == count[2]
    assert len({p[0] for p in patches}) == 2
