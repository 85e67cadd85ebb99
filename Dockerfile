# One image for the Ray head, the Ray workers and the MLflow server, so that Python, Ray and MLflow
# versions match on every node (Ray refuses to join nodes whose versions differ).
FROM python:3.11.7-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# A plain torch requirement takes the CUDA build on Linux: what the GPU workers need.
RUN pip install "torch>=2.4" "ray[default,tune]==2.60.0" "mlflow==3.17.2" "psycopg2-binary>=2.9"

COPY pyproject.toml README.md ./
COPY runctx runctx
COPY service service
COPY agents agents
COPY generative generative
COPY experiments experiments
RUN pip install -e .

CMD ["rlgen", "--help"]
