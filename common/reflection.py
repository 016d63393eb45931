"""Server reflection over both protocol versions: ``grpc.reflection.v1`` and ``v1alpha``.

Current grpcurl, grpc-js and Postman ask for ``grpc.reflection.v1`` first and fall back to
``v1alpha`` only on UNIMPLEMENTED; grpcio-reflection (1.85) ships only ``v1alpha``. The two
versions are the same protocol under another package name (same messages, same field numbers),
so the v1 service here is the library's own v1alpha servicer behind a second method path, with
the v1 file descriptor registered in the default pool so that clients can also resolve the v1
service itself. No reflection code of our own answers a request.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
#: The full method path of each version's only RPC.
V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"
V1ALPHA_METHOD = f"/{V1ALPHA_SERVICE_NAME}/ServerReflectionInfo"

_V1_FILE = "grpc/reflection/v1/reflection.proto"
log = logging.getLogger(__name__)


def _register_v1_descriptor() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` into the default pool (once), derived from
    the v1alpha file: only the package (and the names that carry it) differ."""
    # A grpcio-reflection that ships v1 registers its own file: use it rather than clash.
    with contextlib.suppress(ImportError):
        importlib.import_module("grpc_reflection.v1.reflection_pb2")
    pool = descriptor_pool.Default()
    for find, name in ((pool.FindFileByName, _V1_FILE), (pool.FindServiceByName, V1_SERVICE_NAME)):
        try:
            find(name)
            return  # already there, from us or from another copy of the v1 proto
        except KeyError:
            pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    try:
        pool.Add(proto)
    except TypeError as exc:  # a conflicting definition of some v1 name is already loaded
        log.warning("reflection v1 descriptors not registered (%s); v1 still answers", exc)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection on ``server`` under both ``grpc.reflection.v1`` and ``v1alpha``.

    Args:
        service_names: full names of the services to list (health included); both reflection
            services are added here.
        server: the grpc.aio server, before it starts.
    """
    _register_v1_descriptor()
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    # v1alpha: the library's own registration.
    reflection.enable_server_reflection(names, server)
    # v1: the same servicer; the v1alpha message classes read and write the v1 wire format.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
