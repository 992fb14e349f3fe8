"""The ``route`` label names what was asked for without a series per file, batch or 404."""

from proxy.app import metric_route


def test_paths_with_ids_take_their_routes_template():
    assert metric_route("/v1/chat/completions") == "/v1/chat/completions"
    assert metric_route("/health") == "/health"
    assert metric_route("/v1/files/file-abc") == "/v1/files/{id}"
    assert metric_route("/v1/files/file-abc/content") == "/v1/files/{id}/content"
    assert metric_route("/v1/batches/batch_1/cancel") == "/v1/batches/{id}/cancel"
    assert metric_route("/v1/models/tiny") == "/v1/models/{id}"
    assert metric_route("/v1/nothing") == metric_route("/etc/passwd") == "other"
