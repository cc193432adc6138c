# chatlog: the API (`chatlog serve`) and the projection workers (`chatlog project`) share one image.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CHATLOG_DATA_DIR=/var/lib/chatlog \
    CHATLOG_HOST=0.0.0.0

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY service ./service
COPY projections ./projections
RUN pip install . \
 && useradd --system --home /var/lib/chatlog --create-home chatlog

USER chatlog
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["chatlog", "serve"]
