//! A value read from the spec with where it was written: serde-saphyr's span wrapper,
//! held in a type of this crate so that the spec types can also describe themselves as a
//! JSON Schema (`pipeline schema`): a `Spanned<T>` is written exactly as a `T`.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

pub use serde_saphyr::Location;

#[derive(Clone, Debug, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    /// Where the value was used (an alias's use, or the value itself).
    pub referenced: Location,
    /// Where it was written.
    pub defined: Location,
}

impl<T> Spanned<T> {
    pub const fn new(value: T, referenced: Location, defined: Location) -> Self {
        Self {
            value,
            referenced,
            defined,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde-saphyr recognises its own wrapper and records the span.
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(Self::new(s.value, s.referenced, s.defined))
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}
