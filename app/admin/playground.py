"""The playground: one prompt through an adapter and through the base model, side by side."""

from typing import Annotated

from fastapi import Query, Request

from app import registry
from app.admin.pages import page_router, render
from app.api.deps import SessionDep, SettingsDep
from app.schemas import NoNul

router = page_router()
# Adapters offered in the picker at first; its search box asks the API for the rest.
PICKER_SIZE = 100


@router.get("/playground")
def playground(request: Request, session: SessionDep, settings: SettingsDep,
               adapter: Annotated[str | None, Query(max_length=64), NoNul] = None):
    choices, total = registry.list_adapters(session, limit=PICKER_SIZE)
    chosen = registry.get_adapter(session, adapter) if adapter else None
    if chosen is not None and chosen.id not in {a.id for a in choices}:
        # Linked from an adapter's or a job's page: offer it even when it is old or a job's
        # checkpoint (the picker lists neither).
        choices = [chosen, *choices]
    return render(request, "playground.html", nav="playground", adapters=choices, total=total,
                  chosen=chosen, missing=adapter if adapter and chosen is None else None,
                  max_new_tokens_limit=settings.max_new_tokens_limit)
