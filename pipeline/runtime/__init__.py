"""The worker process: builds each stage's handler and runs it on the Kafka edge."""
