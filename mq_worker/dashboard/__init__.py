"""The operator's web dashboard over the run ledger: workers, runs, output and dead letters.

Served by `mq-worker ledger --http-port PORT` (alongside recording) or by
`mq-worker dashboard` (reading a ledger that another process records). Its
dependencies are the `dashboard` extra: `pip install 'mq-worker[dashboard]'`.
"""
