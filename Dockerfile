# The datamesh image used by docker-compose.yml: every service runs `python -m datamesh <command>`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini celeryconfig.py ./
COPY alembic ./alembic
COPY datamesh ./datamesh
RUN pip install --no-cache-dir '.[full]'
ENV PYTHONUNBUFFERED=1
USER nobody
CMD ["python", "-m", "datamesh", "--help"]
