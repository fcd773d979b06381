from mq_worker.cli import main

main()
