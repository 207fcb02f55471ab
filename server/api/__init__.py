"""HTTP only: OpenAI types, errors, routers and middleware; nothing below here sees a Starlette object."""
