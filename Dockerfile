FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mq_worker ./mq_worker
RUN pip install --no-cache-dir '.[speed,ledger]'
# Runs are processes of this container; stop gracefully on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mq-worker"]
CMD ["start"]
