# One image for everything llmpipe runs; the command picks the role:
#   worker [--stages ...]        the pipeline stages (default), /healthz /readyz /metrics on 9464
#   review serve --host 0.0.0.0  the review UI (its own /healthz on its port)
#   topics apply, dlq ..., trace ..., flags ..., fake-llm ...   the tools
# Used by docker-compose.yml and the Helm chart (infra/helm/llmpipe).

# -- build: a virtualenv with llmpipe installed as a wheel (not editable) ------------------
FROM python:3.11-slim AS build
ENV UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY pipeline ./pipeline
# requirements.lock as constraints: exactly the locked versions, and only what llmpipe needs
# at run time (plus the PostgreSQL driver for the review store), no test or lint tools.
RUN python -m venv --without-pip /opt/llmpipe \
 && uv pip install --python /opt/llmpipe/bin/python --constraints requirements.lock ".[postgres]"
# The codec reads schemas/*.avsc beside the installed package (pipeline/../schemas).
COPY schemas ./schemas
RUN cp -r schemas "$(/opt/llmpipe/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/schemas"

# -- run: the slim base, the virtualenv, the prompt and topic files, an unprivileged user ---
FROM python:3.11-slim
RUN groupadd --system --gid 10001 llmpipe \
 && useradd --system --uid 10001 --gid llmpipe --home-dir /data --create-home \
      --shell /usr/sbin/nologin llmpipe
COPY --from=build /opt/llmpipe /opt/llmpipe
COPY prompts /app/prompts
COPY topics /app/topics
ENV PATH=/opt/llmpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    LLMPIPE_PROMPTS_DIR=/app/prompts \
    LLMPIPE_TOPICS_DIR=/app/topics \
    LLMPIPE_HEALTH_HOST=0.0.0.0 \
    LLMPIPE_HEALTH_PORT=9464
# The working directory is the user's own: a SQLite review store or a users file default there.
WORKDIR /data
USER 10001:10001
EXPOSE 9464
# The worker's liveness (its event loop runs). Other roles set their own: compose points the
# review UI's at its /healthz and switches it off for one-shot tools; Kubernetes ignores it
# and uses the chart's probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLMPIPE_HEALTH_PORT', '9464'), timeout=4)" || exit 1
ENTRYPOINT ["llmpipe"]
CMD ["worker"]
