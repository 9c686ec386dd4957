# The llmpipe image used by docker-compose.yml: every service (worker, fake model, review UI,
# topic setup) is the same image with a different command.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir uv \
 && uv pip install --system --no-cache -r requirements.lock
COPY pipeline ./pipeline
COPY schemas ./schemas
COPY prompts ./prompts
COPY topics ./topics
RUN uv pip install --system --no-cache --no-deps -e .
ENV LLMPIPE_PROMPTS_DIR=/app/prompts LLMPIPE_TOPICS_DIR=/app/topics
ENTRYPOINT ["llmpipe"]
