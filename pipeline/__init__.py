"""llmpipe: a Kafka-native pipeline that makes LLM output safe to use in production."""
