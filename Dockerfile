# syntax=docker/dockerfile:1
# Build stage: install the package and its dependencies into a virtualenv.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /venv
COPY pyproject.toml README.md ./
COPY khqr_gateway ./khqr_gateway
RUN /venv/bin/pip install '.[fast]'

# Run stage: the virtualenv, the migrations, a non-root user.
FROM python:3.11-slim
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 APP_ENV=production PORT=3000
RUN useradd --system --uid 10001 --home-dir /app khqr
WORKDIR /app
COPY --from=build /venv /venv
COPY sql ./sql
USER 10001
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["khqr-gateway", "serve"]
