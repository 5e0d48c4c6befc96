"""What Atelier's own processes get where they run: the environment that points a Ray job, a
replica or a pod at the submitter's storage, and the home folder they keep their cache in."""

from __future__ import annotations

from atelier.settings import Settings

# The submitter's home is a path on the submitter's machine; a pod gets its own, on the node.
POD_HOME = "/var/lib/atelier"


def job_env(settings: Settings) -> dict[str, str]:
    """Environment a Ray job (or replica) needs to reach the same storage as the submitter.

    Keys never travel in job metadata: a job reads them from the same credentials file (embedded
    stack, same machine) or from the cluster's own environment (a Kubernetes Secret).
    """
    env = {
        "ATELIER_S3__ENDPOINT": settings.s3_endpoint,
        "ATELIER_S3__REGION": settings.s3.region,
        "ATELIER_S3__BUCKET": settings.s3.bucket,
        "ATELIER_HOME": str(settings.home),
        "OMP_NUM_THREADS": "1",
    }
    creds = settings.s3.credentials_file or (
        settings.embedded_credentials_file if settings.embedded_s3 else None
    )
    if creds:
        env["ATELIER_S3__CREDENTIALS_FILE"] = str(creds)
    return env


def pod_env(settings: Settings) -> dict[str, str]:
    """Environment of every Atelier pod (RayJob and RayService, head and workers): where storage
    is and the pod's home, never a key nor a file on the submitter's machine (keys come from a
    Secret the pods get as environment variables).

    OMP_NUM_THREADS is left to Ray, which gives each worker the threads of the CPUs it reserved.
    """
    env = {
        "ATELIER_S3__BUCKET": settings.s3.bucket,
        "ATELIER_S3__REGION": settings.s3.region,
        "ATELIER_HOME": POD_HOME,
    }
    if settings.s3.endpoint:  # unset: the AWS default endpoint; the embedded one is local-only
        env["ATELIER_S3__ENDPOINT"] = settings.s3.endpoint
    return env
