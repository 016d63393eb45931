"""TrainerService: the live view of the jobs this trainer worker runs or ran.

``GetJob`` answers from the worker's memory (the etcd record plus the freshest progress);
``WatchJob`` replays a job's event log after a sequence number, then follows it live and ends
after the final state change. A watcher that cannot keep up never slows the job: its queue is
bounded, and when it overflows the watcher is dropped with RESOURCE_EXHAUSTED naming the
sequence to resume after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmesh.common.auth import check_unscoped
from llmesh.common.errors import InvalidArgument, ResourceExhausted, rpc_handler
from llmesh.common.job_rules import check_job_id_length
from llmesh.trainer_worker.job_log import WatcherDropped, is_final_event
from llmesh.trainer_worker.job_manager import JobManager
from llmesh.v1 import trainer_service_pb2 as tr
from llmesh.v1 import trainer_service_pb2_grpc


def _job_id(job_id: str) -> str:
    if not job_id.strip():
        raise InvalidArgument("job_id is empty; give the id CreateTrainingJob returned")
    return check_job_id_length(job_id, "job_id")


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """gRPC front of a :class:`JobManager`.

    Args:
        manager: the worker's jobs.
    """

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    @rpc_handler
    async def GetJob(
        self, request: tr.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> tr.GetJobResponse:
        """The job as this worker knows it; NOT_FOUND for a job that is not on this worker."""
        check_unscoped("training jobs")
        job = await self.manager.get_job(_job_id(request.job_id))
        return tr.GetJobResponse(job=job)

    @rpc_handler
    async def WatchJob(
        self, request: tr.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tr.WatchJobResponse]:
        """Events after ``after_sequence``, then live ones; ends after the final state."""
        if request.after_sequence < 0:
            raise InvalidArgument(
                f"after_sequence={request.after_sequence} is negative; use 0 for the whole log "
                "or the last sequence you saw"
            )
        check_unscoped("training jobs")
        job_log = await self.manager.open_log(_job_id(request.job_id))
        backlog, sub = job_log.subscribe(request.after_sequence)
        last = request.after_sequence
        try:
            for event in backlog:
                yield tr.WatchJobResponse(event=event)
                last = event.sequence
                if is_final_event(event):
                    return
            if sub is None:
                return
            while True:
                try:
                    event = await sub.next()
                except WatcherDropped:
                    raise ResourceExhausted(
                        f"this watch of job {request.job_id!r} fell more than {sub.limit} "
                        f"events behind and was dropped; watch again with after_sequence={last}"
                    ) from None
                yield tr.WatchJobResponse(event=event)
                last = event.sequence
                if is_final_event(event):
                    return
        finally:
            if sub is not None:
                job_log.unsubscribe(sub)
