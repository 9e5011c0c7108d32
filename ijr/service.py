"""JobService over gRPC (grpc.aio): authentication, authorization, audit, and the RPCs.

Every RPC, health and reflection included, needs mutual TLS 1.3 and a bearer token. A job
belongs to the user who started it; other users' jobs are invisible to them (NOT_FOUND),
admins see and stop every job.
"""
import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ijr import tls, token
from ijr.gen import job_pb2, job_pb2_grpc
from ijr.jobs import CannotExecute, Exhausted, InvalidArgument, Job, JobManager, JobRecord, NotFound

audit = logging.getLogger("ijr.audit")
user_var: contextvars.ContextVar[str] = contextvars.ContextVar("user")

STATES = {"running": job_pb2.JobRecord.RUNNING, "exited": job_pb2.JobRecord.EXITED,
          "killed": job_pb2.JobRecord.KILLED, "stopped": job_pb2.JobRecord.STOPPED,
          "oom_killed": job_pb2.JobRecord.OOM_KILLED}
ERRORS = {InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
          CannotExecute: grpc.StatusCode.FAILED_PRECONDITION, Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED}


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks TLS 1.3 and the bearer token before any handler runs, and audits every RPC."""

    def __init__(self, secret: bytes, tokens_dir: str):
        self.secret = secret
        self.tokens_dir = tokens_dir

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        metadata = dict(details.invocation_metadata or ())
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, details.method, metadata))
        kind = "unary_stream" if handler.unary_stream else "stream_stream" if handler.stream_stream else "stream_unary"
        if kind == "stream_unary":  # nothing served here streams requests into one reply
            raise NotImplementedError(f"{details.method}: client-streaming RPCs are not wrapped")
        return handler._replace(**{kind: self._stream(getattr(handler, kind), details.method, metadata)})

    def authenticate(self, context: grpc.aio.ServicerContext, metadata: dict) -> str:
        """The user the token names; raises ValueError or TokenError with the reason otherwise."""
        version = context.auth_context().get("ssl_tls_version", [b"?"])[0].decode()
        if version != tls.TLS_VERSION:
            raise ValueError(f"{version} refused: TLS 1.3 is required")
        header = metadata.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ValueError("missing 'authorization: Bearer <token>' metadata")
        return token.validate(presented.strip(), self.secret, self.tokens_dir).userId

    def _unary(self, behavior: Callable, method: str, metadata: dict) -> Callable:
        async def wrapper(request, context):
            started = time.monotonic()
            user = await self._enter(context, metadata, method, request, started)
            try:
                response = await behavior(request, context)
            except BaseException as err:
                _audit(user, method, request, _failure(context, err), started)
                raise
            _audit(user, method, response if hasattr(response, "job_id") else request, context.code(), started)
            return response
        return wrapper

    def _stream(self, behavior: Callable, method: str, metadata: dict) -> Callable:
        """Server-streaming and bidi handlers: async generators, or coroutines using context.write."""
        async def wrapper(request, context):
            started = time.monotonic()
            user = await self._enter(context, metadata, method, request, started)
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for message in result:
                        yield message
                else:
                    await result
            except BaseException as err:
                _audit(user, method, request, _failure(context, err), started)
                raise
            _audit(user, method, request, context.code(), started)
        return wrapper

    async def _enter(self, context, metadata: dict, method: str, request, started: float) -> str:
        try:
            user = self.authenticate(context, metadata)
        except (ValueError, token.TokenError) as err:
            _audit("-", method, request, grpc.StatusCode.UNAUTHENTICATED, started, str(err))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        except OSError as err:  # out of descriptors: the token may be fine, ijrd is not
            _audit("-", method, request, grpc.StatusCode.UNAVAILABLE, started, str(err))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"ijrd cannot check tokens now: {err.strerror}")
        user_var.set(user)
        return user


def _failure(context, err: BaseException) -> grpc.StatusCode:
    """The status an RPC that raised ends with: the one it aborted with, or what grpc reports."""
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED  # the client went away
    return context.code() or grpc.StatusCode.UNKNOWN


def _audit(user: str, method: str, message, code, started: float, why: str = "") -> None:
    """One line per RPC: user, method, job, outcome, duration. The job id is the caller's
    text, so it is escaped and cut: it must not be able to forge or flood audit lines."""
    job = (getattr(message, "job_id", "") or "-")[:80].encode("unicode_escape").decode()
    outcome = (code or grpc.StatusCode.OK).name
    audit.info("user=%s method=%s job=%s outcome=%s ms=%.1f%s", user, method.rsplit("/", 1)[-1], job,
               outcome, (time.monotonic() - started) * 1000, f" why={why!r}" if why else "")


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def to_proto(record: JobRecord) -> job_pb2.JobRecord:
    return job_pb2.JobRecord(
        job_id=record.id, job_start=_timestamp(record.start), job_command=record.command,
        cpu_shares=record.cpu_shares, memory_limit_in_bytes=record.memory_bytes,
        disk_read_iops_limit=record.read_iops, disk_write_iops_limit=record.write_iops,
        state=STATES[record.state], exit_code=record.exit_code, signal=record.signal,
        oom_killed=record.oom_killed, job_end=_timestamp(record.end), owner=record.owner,
        job_arguments=record.args, error=record.error, pids_limit=record.pids_max)


class JobService(job_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, admins: frozenset[str]):
        self.manager = manager
        self.admins = admins
        self._protos: dict[str, tuple[str, job_pb2.JobRecord]] = {}  # id -> (state, message)

    def _proto(self, record: JobRecord) -> job_pb2.JobRecord:
        """Built once per job state: building messages dominated ListJobs with many jobs."""
        cached = self._protos.get(record.id)
        if cached is None or cached[0] != record.state:
            cached = self._protos[record.id] = (record.state, to_proto(record))
        return cached[1]

    def _visible(self, record: JobRecord) -> bool:
        user = user_var.get()
        return user in self.admins or record.owner == user

    async def _job(self, job_id: str, context) -> Job:
        """The caller's job; someone else's job answers exactly like a job that does not exist."""
        try:
            job = self.manager.get(job_id)
            if not self._visible(job.record):
                raise NotFound(f"no job {job_id}")
            return job
        except (InvalidArgument, NotFound) as err:
            await context.abort(ERRORS[type(err)], str(err))

    async def StartJob(self, request, context):
        try:
            record = await self.manager.start(
                user_var.get(), request.job_command, list(request.job_arguments), request.cpu_shares,
                request.memory_limit_in_bytes, request.disk_read_iops_limit, request.disk_write_iops_limit)
        except (InvalidArgument, CannotExecute, Exhausted) as err:
            await context.abort(ERRORS[type(err)], str(err))
        return job_pb2.StartResponse(job_id=record.id, job_start=_timestamp(record.start))

    async def ListJobs(self, request, context):
        records = [self._proto(r) for r in self.manager.list(request.include_finished) if self._visible(r)]
        return job_pb2.ListJobsResponse(job_records=records)

    async def GetJobStatus(self, request, context):
        return self._proto((await self._job(request.job_id, context)).record)

    async def StopJob(self, request, context):
        job = await self._job(request.job_id, context)
        await self.manager.stop(job.record.id)
        return job_pb2.StopResponse(status=job_pb2.StopResponse.STOPPED)

    async def StreamJobOutput(self, request, context):
        await self._job(request.job_id, context)
        async for chunk in self.manager.output(request.job_id):
            yield job_pb2.JobOutput(output=chunk)


def add_to_server(server: grpc.aio.Server, manager: JobManager, admins: frozenset[str]) -> None:
    """JobService, the standard health service and server reflection."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    job_pb2_grpc.add_JobServiceServicer_to_server(JobService(manager, admins), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (job_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return health_servicer
