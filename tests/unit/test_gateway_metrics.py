"""The route label names what was asked for without a series per file, batch or 404; a key's
queue depth is one gauge over every queue it waits in."""

from proxy.app import metric_route


def test_paths_with_ids_take_their_routes_template():
    assert metric_route("/v1/chat/completions") == "/v1/chat/completions"
    assert metric_route("/health") == "/health"
    assert metric_route("/v1/files/file-abc") == "/v1/files/{id}"
    assert metric_route("/v1/files/file-abc/content") == "/v1/files/{id}/content"
    assert metric_route("/v1/batches/batch_1/cancel") == "/v1/batches/{id}/cancel"
    assert metric_route("/v1/models/tiny") == "/v1/models/{id}"
    assert metric_route("/v1/nothing") == metric_route("/etc/passwd") == "other"


def test_a_keys_queue_depth_counts_every_engine_and_its_batch_lane():
    import asyncio
    from types import SimpleNamespace

    from proxy.app import admission_observer
    from proxy.observe.metrics import Metrics
    from proxy.tenancy.admission import FairQueue, Tenant

    metrics = Metrics()
    holder: dict = {}
    observer = admission_observer(metrics, lambda: holder["engines"], several=True)
    queues = [FairQueue(1, 10, observer), FairQueue(1, 10, observer)]
    holder["engines"] = SimpleNamespace(all=[SimpleNamespace(queue=q) for q in queues])

    async def main() -> float:
        busy = [queue.slot(Tenant("other")) for queue in queues]
        for slot in busy:
            await slot.__aenter__()
        waiting = [asyncio.create_task(hold(queues[0], Tenant("k"))),
                   asyncio.create_task(hold(queues[1], Tenant("k"))),
                   asyncio.create_task(hold(queues[1], Tenant("k", background=True)))]
        await asyncio.sleep(0)
        depth = metrics.registry.get_sample_value("appliance_queue_depth", {"key": "k"})
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return depth

    async def hold(queue: FairQueue, tenant: Tenant) -> None:
        async with queue.slot(tenant):
            pass

    assert asyncio.run(main()) == 3
