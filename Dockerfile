FROM python:3.11-slim

# tini is PID 1: it reaps the orphaned grandchildren of runs (a worker as PID 1 would
# leave them as zombies) and passes SIGTERM on to the worker, which drains its runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mq_worker ./mq_worker
RUN pip install --no-cache-dir '.[speed,ledger]'

# Runs are processes of this container: never root. A numeric id lets Kubernetes'
# runAsNonRoot verify it.
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/mq-worker mq-worker \
    && mkdir -p /var/lib/mq-worker/spool && chown -R 10001:10001 /var/lib/mq-worker
USER 10001:10001
WORKDIR /var/lib/mq-worker

# `docker stop` sends SIGTERM and kills after 10 s by default: cancel runs still running
# after 8 s so that worker.stopped and the runs' events are published before the kill
# (raise both together: `docker stop -t`, Compose's stop_grace_period, Kubernetes'
# terminationGracePeriodSeconds). Unpublished events survive a restart in the spool.
ENV PYTHONUNBUFFERED=1 \
    TINI_SUBREAPER=1 \
    MQ_WORKER_LOG_FORMAT=json \
    MQ_WORKER_DRAIN_TIMEOUT=8 \
    MQ_WORKER_SPOOL_DIR=/var/lib/mq-worker/spool
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "mq-worker"]
CMD ["start"]
