"""The server registration that lets a handler answer with its response already serialized
(``answers.Serialized``): the generated registration, with each handler's response
serializer passing such bytes through unchanged."""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio

from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc


def add_to_server(servicer: m_grpc.MonitorServiceServicer, server: aio.Server) -> None:
    """Register ``servicer`` as the generated code does, except that a handler may answer
    with its response already serialized (``answers.Serialized``): it is sent unchanged."""
    recorded = _Recorded()
    m_grpc.add_MonitorServiceServicer_to_server(servicer, recorded)
    handlers = {name: _sending_bytes(h) for name, h in recorded.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(recorded.service, handlers),)
    )
    server.add_registered_method_handlers(recorded.service, handlers)


class _Recorded:
    """Stands for the server while the generated code registers its handlers."""

    service = ""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, handlers


def _sending_bytes(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    serialize = handler.response_serializer

    def serializer(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        return serialize(response)  # type: ignore[no-any-return]

    if handler.unary_unary:
        make, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        make, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        make, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        make, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return make(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=serializer
    )
