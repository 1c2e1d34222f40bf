//! API groups' request body (`ApiGroupCreate`, create and update), typed and checked: a name
//! by Huawei's group rule and a remark of at most 255 characters. Whether the name is free
//! in the project is the handler's (`management`), which reads the state.

use serde::Deserialize;

use super::error::ControlError;
use super::management::checked_remark;
use super::rule::{self, GROUP_NAME};

/// The body of group create and update; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GroupBody {
    pub name: Option<String>,
    pub remark: Option<String>,
}

impl GroupBody {
    /// `(name, remark)`.
    pub fn validate(self) -> Result<(String, String), ControlError> {
        let name = rule::required_text("name", self.name)?;
        GROUP_NAME.check("name", &name)?;
        Ok((name, checked_remark(self.remark)?))
    }
}
