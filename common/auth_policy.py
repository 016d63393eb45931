"""Who may call which RPC: the one table of roles and model scopes.

``admin`` may call everything; ``user`` inference and read-only calls. A method missing from
:data:`RULES` needs ``admin`` (fail closed), and ``test_every_rpc_of_every_service_has_a_rule``
(``tests/unit/test_auth_tokens.py``) fails for it, so a new RPC cannot slip through
unclassified.

Open: ``grpc.health.v1.Health`` (load balancers and orchestrators probe without tokens).
Reflection needs a valid token of any role: it describes services whose read-only calls a
``user`` token may make, and describing a method grants nothing. (A stream's request body
names the service it asks about, which an interceptor cannot see, so it cannot follow each
described service's own rule any closer than that.)

Model scopes: for unary requests, :data:`RULES` says where the model name sits and the
interceptor checks it; streamed requests (``Chat``, ``ChatSession``) carry it inside the stream,
so their servicer calls :func:`llmesh.common.auth.check_model` for each request it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmesh.common.auth import ROLE_ADMIN, ROLE_USER

OPEN = "open"


@dataclass(frozen=True)
class Rule:
    """How one RPC is authorized.

    Attributes:
        role: ``admin``, ``user`` or ``open`` (no token needed).
        models: the model names a request names (for unary requests), or None.
        streamed_models: the servicer checks the models inside the request stream.
    """

    role: str
    models: Callable[[Any], list[str]] | None = None
    streamed_models: bool = False

    @property
    def admin(self) -> bool:
        return self.role == ROLE_ADMIN


def _field(name: str) -> Callable[[Any], list[str]]:
    return lambda request: [getattr(request, name)]


def _model_name(request: Any) -> list[str]:
    return [request.model.name]


_CP = "/llmesh.v1.ControlPlaneService/"
_INF = "/llmesh.v1.InferenceService/"
_REP = "/llmesh.v1.ReplicaService/"
_TR = "/llmesh.v1.TrainerService/"

#: Every RPC llmesh serves, with its rule.
RULES: dict[str, Rule] = {
    # Control plane: deploys and training jobs change the mesh; the rest reads it.
    _CP + "DeployModel": Rule(ROLE_ADMIN, _model_name),
    _CP + "UndeployModel": Rule(ROLE_ADMIN, _field("name")),
    _CP + "GetModel": Rule(ROLE_USER, _field("name")),
    _CP + "ListModels": Rule(ROLE_USER),
    _CP + "ListWorkers": Rule(ROLE_USER),
    _CP + "AssignWorker": Rule(ROLE_USER, _field("model")),
    _CP + "WatchModel": Rule(ROLE_USER, _field("name")),
    _CP + "CreateTrainingJob": Rule(ROLE_ADMIN),
    _CP + "GetTrainingJob": Rule(ROLE_USER),
    _CP + "ListTrainingJobs": Rule(ROLE_USER),
    _CP + "CancelTrainingJob": Rule(ROLE_ADMIN),
    _CP + "WatchTrainingJob": Rule(ROLE_USER),
    # Replica processes: inference for users (Abort names a request id only).
    _INF + "Chat": Rule(ROLE_USER, streamed_models=True),
    _INF + "ChatSession": Rule(ROLE_USER, streamed_models=True),
    _INF + "Generate": Rule(ROLE_USER, _field("model")),
    _INF + "Embed": Rule(ROLE_USER, _field("model")),
    _INF + "Rerank": Rule(ROLE_USER, _field("model")),
    _INF + "Tokenize": Rule(ROLE_USER, _field("model")),
    _INF + "ApplyChatTemplate": Rule(ROLE_USER, _field("model")),
    _INF + "GetModelMeta": Rule(ROLE_USER, _field("model")),
    _INF + "Abort": Rule(ROLE_USER),
    # The node agent's handle on its replica processes: the agent's own admin token only.
    _REP + "WatchReplica": Rule(ROLE_ADMIN),
    _REP + "LoadAdapter": Rule(ROLE_ADMIN, _model_name),
    _REP + "UnloadAdapter": Rule(ROLE_ADMIN, _field("model")),
    _REP + "Drain": Rule(ROLE_ADMIN),
    # Trainer workers: the control plane relays these for the caller, with the caller's token.
    _TR + "GetJob": Rule(ROLE_USER),
    _TR + "WatchJob": Rule(ROLE_USER),
}

_OPEN_SERVICES = ("/grpc.health.v1.Health/",)
_TOKEN_ONLY_SERVICES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_ADMIN_FALLBACK = Rule(ROLE_ADMIN)


def rule_for(method: str) -> Rule:
    """The rule for a full method name (``/package.Service/Method``); admin when unknown."""
    rule = RULES.get(method)
    if rule is not None:
        return rule
    if method.startswith(_OPEN_SERVICES):
        return Rule(OPEN)
    if method.startswith(_TOKEN_ONLY_SERVICES):
        return Rule(ROLE_USER)
    return _ADMIN_FALLBACK


def role_allows(have: str, need: str) -> bool:
    """Whether a token of role ``have`` may call an RPC that needs ``need``."""
    return need == OPEN or have == ROLE_ADMIN or have == need
