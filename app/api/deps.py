"""Shared FastAPI dependencies. The one place that reads the node's Runtime off the app (app.main
sets it): routes, admin pages and authentication take it, or what they need of it, from here."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_node_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_node_settings)]


AdapterId = Annotated[str, Path(description="Adapter id", examples=["3f9a1c2b7d4e"])]
JobId = Annotated[str, Path(description="Training job id", examples=["a41c9e2f0b7d"])]


def invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the body field."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])
