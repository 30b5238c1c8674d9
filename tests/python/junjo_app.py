"""A tiny two-node junjo workflow exported with junjo's own JunjoOtelExporter.

OpenTelemetry allows one global tracer provider per process, and junjo uses the
global one, so every run happens in a fresh interpreter: `run()` spawns
`python junjo_app.py ENDPOINT API_KEY SERVICE`.
"""
import asyncio
import subprocess
import sys

from junjo import BaseState, BaseStore, Edge, Graph, Node, Workflow
from junjo.telemetry.junjo_otel_exporter import JunjoOtelExporter
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


class CountState(BaseState):
    items: list[str]
    count: int | None = None
    greeting: str | None = None


class CountStore(BaseStore[CountState]):
    async def set_count(self, payload: int) -> None:
        await self.set_state({"count": payload})

    async def set_greeting(self, payload: str) -> None:
        await self.set_state({"greeting": payload})


class CountNode(Node[CountStore]):
    async def service(self, store: CountStore) -> None:
        state = await store.get_state()
        await store.set_count(len(state.items))


class GreetNode(Node[CountStore]):
    async def service(self, store: CountStore) -> None:
        state = await store.get_state()
        await store.set_greeting(f"hello {state.count}")


def make_workflow() -> Workflow:
    def graph() -> Graph:
        count, greet = CountNode(), GreetNode()
        return Graph(source=count, sinks=[greet], edges=[Edge(tail=count, head=greet)])

    return Workflow[CountState, CountStore](
        name="CountWorkflow",
        graph_factory=graph,
        store_factory=lambda: CountStore(initial_state=CountState(items=["a", "b", "c"])),
    )


def run(endpoint: str, api_key: str, service: str) -> None:
    """Runs the workflow once in a fresh interpreter and waits for the export."""
    subprocess.run([sys.executable, __file__, endpoint, api_key, service], check=True, timeout=120)


def _run_here(endpoint: str, api_key: str, service: str) -> None:
    exporter = JunjoOtelExporter(endpoint=endpoint, api_key=api_key, insecure=True)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(exporter.span_processor)
    trace.set_tracer_provider(provider)
    asyncio.run(make_workflow().execute())
    assert provider.force_flush(30_000)
    provider.shutdown()


if __name__ == "__main__":
    _run_here(*sys.argv[1:4])
