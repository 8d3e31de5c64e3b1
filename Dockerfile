# The datamesh image used by docker-compose.yml: every service runs `python -m datamesh <command>`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini celeryconfig.py ./
COPY alembic ./alembic
COPY datamesh ./datamesh
RUN pip install --no-cache-dir '.[full]'
ENV PYTHONUNBUFFERED=1
# The data folder and every volume's mount point under it belong to the user the services run as:
# a new named volume takes the owner of the folder it is mounted on, and beat writes its schedule here.
RUN mkdir -p /var/lib/datamesh/ap/eu-west /var/lib/datamesh/ap/us-east /var/lib/datamesh/index \
    && chown -R nobody:nogroup /var/lib/datamesh
USER nobody
CMD ["python", "-m", "datamesh", "--help"]
